// C ABI of the emulation itself (csrc/emu/simt.h), linked into every emulation library: the emulated
// device table and schedule seed, launch counters and the first error of a failed launch.
#include <algorithm>
#include <mutex>
#include <string>

#include "simt.h"

extern "C" {

// Makes the device (sms, blocks_per_sm, coop) current (a new device id for a new configuration, see
// NOTE [Emulated devices] in simt.h) and sets the schedule seed (NOTE [Schedules]).
void emu_configure(int sms, int blocks_per_sm, int coop, unsigned seed) {
  auto& G = fusedlars_emu::global();
  std::lock_guard<std::mutex> lock(G.mu);
  const fusedlars_emu::Device d{sms, blocks_per_sm, coop ? 1 : 0};
  auto it = std::find(G.devices.begin(), G.devices.end(), d);
  if (it == G.devices.end()) it = G.devices.insert(G.devices.end(), d);
  G.current = static_cast<int>(it - G.devices.begin());
  G.seed = seed;
}

// Clears the launch counters, the sticky error and the error text.
void emu_reset() {
  auto& G = fusedlars_emu::global();
  std::lock_guard<std::mutex> lock(G.mu);
  G.launches = G.coop_launches = 0;
  G.last_grid = 0;
  G.last_error = cudaSuccess;
  G.error_text.clear();
}

// launches, cooperative launches, blocks of the last launch
void emu_counters(long* out) {
  auto& G = fusedlars_emu::global();
  std::lock_guard<std::mutex> lock(G.mu);
  out[0] = G.launches;
  out[1] = G.coop_launches;
  out[2] = G.last_grid;
}

// The first emulation error since emu_reset (a divergent barrier, a deadlock ...), or "".
const char* emu_error_text() {
  auto& G = fusedlars_emu::global();
  std::lock_guard<std::mutex> lock(G.mu);
  static thread_local std::string copy;
  copy = G.error_text;
  return copy.c_str();
}

}  // extern "C"
