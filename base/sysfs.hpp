// base/sysfs.hpp - whether this process may change a kernel parameter file
// (/sys/module/*/parameters/*, /proc/sys/*). One answer for every report:
// root passes access(W_OK) whatever the mode, but sysfs refuses a write to
// a 0444 parameter even to root (EACCES), so the mode decides first.
#pragma once

#include <string>

namespace mvm {

// True when `path` has its owner's write bit and opens for writing here
// (nothing is written). False for a missing file.
bool param_file_writable(const std::string& path);

}  // namespace mvm
