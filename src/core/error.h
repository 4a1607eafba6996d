// error.h — the one exception type for bad input and environment failures.
// Its message is complete and user-facing: it names the file / key and says what was
// expected versus what was found. The CLI prints it on one line and exits non-zero.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace verl {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Throw an Error whose message is the streamed concatenation of the arguments.
template <class... A>
[[noreturn]] void fail(const A&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw Error(os.str());
}

}  // namespace verl
