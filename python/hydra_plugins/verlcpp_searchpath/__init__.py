"""Hydra search-path plugin (Hydra discovers every module under the `hydra_plugins` namespace
package): adds verlcpp's config folder, so verl's trainers accept `engine=verlcpp`
(python/verlcpp/hydra_config/engine/verlcpp.yaml) beside their own engine/fsdp.yaml.
"""
from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class VerlcppSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="verlcpp", path="pkg://verlcpp.hydra_config")
