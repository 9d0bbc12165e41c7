// Forwarding header of the CUDA-on-CPU emulation: the grid group of a cooperative launch.
// grid.sync() is a real barrier across the blocks' OS threads (csrc/emu/simt.h); calling it in a
// kernel that was not launched cooperatively stops the launch with an error, as the GPU would hang.
#pragma once
#include "../simt.h"

namespace cooperative_groups {
struct grid_group {
  void sync() const { ::fusedlars_emu::grid_sync_here(); }
  bool is_valid() const { return ::fusedlars_emu::tl_block && ::fusedlars_emu::tl_block->L->coop; }
};
inline grid_group this_grid() { return grid_group{}; }
}  // namespace cooperative_groups
