// The backend a thread's caller forced (vitkernels.use_backend, else VITK_BACKEND). Kept apart from
// registration.h, whose dispatcher headers c_api.cpp does not need.
#pragma once

namespace vitk {

enum class Backend : int { kAuto = 0, kCpu = 1, kCuda = 2, kTriton = 3 };

const char* backend_name(Backend b);

// The backend this thread's caller forced: the innermost vitkernels.use_backend block, else
// VITK_BACKEND (read on every call, so a change of the environment takes effect at once), else
// kAuto. A VITK_BACKEND that names no backend raises a ValueError naming the variable.
Backend forced_backend();

// The thread's use_backend override: -1 when none is set (VITK_BACKEND then applies), else a
// Backend value. Returns the previous one, so a context manager can restore it.
int set_thread_backend(int code);

}  // namespace vitk
