// Kernels that test the emulation itself (tests/test_cuda_emulation.py): each shows one thing the
// emulation must catch or get right. Built like csrc/cuda (the <<<...>>> launches are rewritten).
#include <cooperative_groups.h>
#include <cuda_runtime.h>

namespace cg = cooperative_groups;

namespace {

__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void shuffle_after_exit(double* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<double>(threadIdx.x), 1);
}

__global__ void barrier_after_exit(int* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void grid_sync_kernel(int* out) {
  out[blockIdx.x] = 1;
  cg::this_grid().sync();
  out[gridDim.x + blockIdx.x] = 2;
}

// Warp shuffle tree + block sum of 1..n; `sync` 0 drops the barrier between the shared writes and reads.
__global__ void block_sum(const float* x, float* out, int sync) {
  __shared__ float sh[8];
  float v = x[threadIdx.x];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
  if (sync) __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (int w = 0; w < static_cast<int>(blockDim.x) / 32; ++w) s += sh[w];
    out[blockIdx.x] = s;
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = -1.f;  // poison for the next block on this OS thread
}

// Each block writes its partial, then block 0 sums them: needs the grid barrier (`sync` 1).
__global__ void two_phase(float* part, float* out, int sync) {
  if (threadIdx.x == 0) part[blockIdx.x] = static_cast<float>(blockIdx.x + 1);
  if (sync) cg::this_grid().sync();
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    float s = 0.f;
    for (unsigned b = 0; b < gridDim.x; ++b) s += part[b];
    *out = s;
  }
}

// A 128-bit load through a pointer that is not 16-byte aligned (UBSan stops here).
__global__ void misaligned_load(const float* p, float* out) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p + 1);
  out[0] = static_cast<float>(raw.x);
}

int launched(cudaError_t e) { return e == cudaSuccess ? static_cast<int>(cudaGetLastError()) : static_cast<int>(e); }

// A cooperative launch of `fn` on `grid` blocks of 32 threads.
template <class... P, class... A>
cudaError_t coop_launch(void (*fn)(P...), unsigned grid, A... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(32);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, fn, args...);
}

}  // namespace

extern "C" {

int st_divergent_barrier(int* out) {
  divergent_barrier<<<1, 32>>>(out);
  return launched(cudaSuccess);
}

int st_shuffle_after_exit(double* out) {
  shuffle_after_exit<<<1, 32>>>(out);
  return launched(cudaSuccess);
}

int st_barrier_after_exit(int* out) {
  barrier_after_exit<<<1, 64>>>(out);
  return launched(cudaSuccess);
}

// coop 0: a plain launch (grid.sync() there is an error)
int st_grid_sync(int* out, unsigned grid, int coop) {
  if (!coop) {
    grid_sync_kernel<<<grid, 32>>>(out);
    return launched(cudaSuccess);
  }
  return launched(coop_launch(grid_sync_kernel, grid, out));
}

int st_block_sum(const float* x, float* out, unsigned blocks, int sync) {
  block_sum<<<blocks, 256, 0, nullptr>>>(x, out, sync);
  return launched(cudaSuccess);
}

int st_two_phase(float* part, float* out, unsigned grid, int sync) {
  return launched(coop_launch(two_phase, grid, part, out, sync));
}

int st_misaligned_load(const float* p, float* out) {
  misaligned_load<<<1, 1>>>(p, out);
  return launched(cudaSuccess);
}

}  // extern "C"
