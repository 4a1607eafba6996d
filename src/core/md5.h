// md5.h — MD5 digest as lowercase hex, used only to name cache folders (<cache>/<md5(src)>/),
// matching verl's `hashlib.md5(src.encode()).hexdigest()`. Not for security.
#pragma once
#include <string>

namespace verl {
std::string md5_hex(const std::string& data);
}
