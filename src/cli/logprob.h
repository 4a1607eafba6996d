// logprob.h (cli) — declares the `verlcpp logprob` subcommand registration.
#pragma once
#include <CLI/CLI.hpp>

#include "engine/logprob.h"

namespace verl {
CLI::App* add_logprob_subcommand(CLI::App& app, LogprobOptions& o);
// Checks that need no model: --out must not be the --batch file (by device + inode, so a
// symlink or hard link counts). Throws Error.
void check_logprob_options(const LogprobOptions& o);
}
