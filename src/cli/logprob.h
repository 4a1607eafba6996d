// logprob.h (cli) — declares the `verlcpp logprob` subcommand registration.
#pragma once
#include <CLI/CLI.hpp>

#include "engine/logprob.h"

namespace verl {
CLI::App* add_logprob_subcommand(CLI::App& app, LogprobOptions& o);
}
