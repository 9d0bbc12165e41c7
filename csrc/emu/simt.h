// A small SIMT emulation of the CUDA execution model on the CPU, for executing csrc/cuda's kernels and
// host launchers unmodified in CI (no GPU there). Not a product file: nothing of the extension includes it.
//
// Compiled as plain C++17 with g++ (see tests/cuda_emu.py, which builds csrc/cuda/fused_kernels.cu with
// the forwarding headers of csrc/emu/include/ first on the include path, after rewriting each
// `kernel<<<grid, block, smem, stream>>>(args)` into `::fusedlars_emu::Launcher(grid, block, smem,
// stream)(kernel, args)`).
//
// Model:
//   * every CUDA thread is a fiber (its own stack; ucontext to start, _setjmp/_longjmp to switch);
//     one OS thread runs one block at a time, so `__shared__` is `static thread_local`;
//   * fibers run one at a time and switch only at synchronization points (__syncthreads, warp
//     shuffles, grid.sync, exit). Which ready fiber runs next is chosen by a seeded policy (below),
//     so a missing __syncthreads shows as a wrong result under some schedule, as on a GPU;
//   * a cooperative launch (cudaLaunchKernelEx with cudaLaunchAttributeCooperative) gives every block
//     its own OS thread and cg::this_grid().sync() is a real barrier across them; the grid must fit
//     the emulated device (SMs x blocks per SM), as on a GPU. A plain launch runs blocks on a few
//     workers, and grid.sync() there is an error;
//   * a device table (emu_configure; NOTE [Emulated devices]) gives the launcher an SM count, blocks
//     per SM and cooperative support, so the real host code chooses each launch path and grid size;
//   * `uint4` is a 16-byte aligned struct: a 128-bit access through a misaligned pointer is undefined
//     behaviour that UBSan (-fsanitize=alignment) stops on, like the GPU's misaligned-address fault;
//   * errors stop the launch with a message (cudaGetLastError() then returns cudaErrorLaunchFailure
//     and emu_last_error() the text): a __syncthreads reached at different source lines, a barrier or
//     shuffle that a thread of the block/warp exited before, grid.sync() outside a cooperative launch
//     or after a block exited, a deadlock (no fiber can run).
//
// NOTE: [Schedules] `seed % 4` picks one of four schedules (seeds >= 4 reseed the random choices):
//   0  fibers first-in first-out (warps advance in lockstep); blocks one at a time in grid order
//   1  last-in first-out (one warp runs ahead until it blocks);   blocks one at a time, reversed
//   2  uniformly random ready fiber;                               blocks one at a time, random order
//   3  LIFO with the warps' start order shuffled;                  blocks concurrently on OS threads
// "One at a time" hands a baton from block to block at each grid.sync() and exit: a block that reads
// what another block writes without a grid barrier in between sees stale data in those schedules,
// deterministically, instead of only when the OS thread timing happens to expose it.
//
// NOTE: [What is not emulated] The GPU memory model (a missing __threadfence() does not show), warp
// lockstep execution within a barrier interval (threads of a warp run one after another between
// synchronization points), and float rounding of the GPU (nvcc contracts multiply-adds; compare with
// the reference at a tolerance, and bitwise only between launches of this emulation).
#pragma once

#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ------------------------------------------------------------------------------------------------
// CUDA vocabulary types

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
// NOTE: 16-byte aligned like the GPU's uint4: 128-bit access needs an aligned address.
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719,
  cudaErrorCooperativeLaunchTooLarge = 720,
  cudaErrorNotSupported = 801,
};
typedef enum cudaError cudaError_t;
typedef struct CUstream_st* cudaStream_t;

enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrCooperativeLaunch = 95 };
enum cudaStreamCaptureStatus {
  cudaStreamCaptureStatusNone = 0,
  cudaStreamCaptureStatusActive = 1,
  cudaStreamCaptureStatusInvalidated = 2
};
enum cudaLaunchAttributeID { cudaLaunchAttributeIgnore = 0, cudaLaunchAttributeCooperative = 2 };
union cudaLaunchAttributeValue {
  char pad[64];
  int cooperative;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned int numAttrs;
};

// The built-in variables: per OS thread, set by the block scheduler before it resumes a fiber (one
// fiber runs at a time on an OS thread).
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace fusedlars_emu {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 128 << 10;  // per fiber; a guard page below each stack
constexpr int kMaxThreadsPerBlock = 1024;

// ------------------------------------------------------------------------------------------------
// the emulated device and process-wide state (set from the driver through emu_configure)

struct Device {
  int sms = 4;
  int blocks_per_sm = 2;
  int coop = 1;
  bool operator==(const Device& o) const { return sms == o.sms && blocks_per_sm == o.blocks_per_sm && coop == o.coop; }
};

// NOTE: [Emulated devices] Each distinct (SMs, blocks per SM, cooperative) configuration is a device of
// its own, and emu_configure makes it the current one: host code may cache device attributes per device
// id (csrc/cuda's launcher does), as it may on a GPU, where attributes never change.
struct Global {
  std::mutex mu;
  std::vector<Device> devices{Device{}};
  int current = 0;
  unsigned seed = 0;
  cudaError_t last_error = cudaSuccess;
  std::string error_text;
  long launches = 0;     // kernel launches since the last reset
  long coop_launches = 0;
  int last_grid = 0;
  std::vector<std::pair<void*, size_t>> free_stacks;  // reusable fiber stack sets
};

inline Global& global() {
  static Global g;
  return g;
}

[[noreturn]] inline void fatal(const char* what) {
  std::fprintf(stderr, "fusedlars_emu: fatal: %s\n", what);
  std::abort();
}

// ------------------------------------------------------------------------------------------------
// fibers and blocks

enum class FiberState : uint8_t { Fresh, Ready, Running, AtBarrier, AtShuffle, AtGrid, Done };

struct Fiber {
  uint3 tid;
  int lin = 0;  // linear thread index in the block
  FiberState st = FiberState::Fresh;
  jmp_buf jb;
  ucontext_t uc;
  char* stack = nullptr;
  bool started = false;
};

struct WarpRendezvous {
  int arrived = 0;
  unsigned gen = 0;
  int line = 0;
  const char* file = nullptr;
  const char* what = nullptr;
  uint64_t buf[2][kWarpSize];
};

struct Launch;

// One block being executed on the current OS thread.
struct Block {
  Launch* L = nullptr;
  uint3 bid{0, 0, 0};
  int lin = 0;
  int nthreads = 0;
  std::vector<Fiber>* fibers = nullptr;
  std::vector<WarpRendezvous> warps;
  std::vector<int> ready;
  size_t ready_head = 0;  // FIFO policy
  int policy = 0;
  std::mt19937 rng;
  Fiber* cur = nullptr;
  jmp_buf sched;
  int exited = 0;
  int at_barrier = 0;
  int bar_line = 0;
  const char* bar_file = nullptr;
  int at_grid = 0;
};

inline thread_local Block* tl_block = nullptr;

// ------------------------------------------------------------------------------------------------
// one kernel launch

struct Launch {
  dim3 grid, block;
  bool coop = false;
  std::function<void()> body;
  int mode = 0;  // NOTE [Schedules]
  unsigned seed = 0;
  long index = 0;
  bool baton = true;
  std::vector<int> order;  // block run order (linear block indices)

  std::mutex mu;
  std::condition_variable cv;
  size_t turn = 0;         // baton: position in `order` of the block that may run
  int arrived = 0;         // blocks waiting at grid.sync()
  unsigned gen = 0;        // grid barrier generation
  int finished = 0;        // blocks that returned
  std::atomic<bool> aborted{false};
  std::string error;

  int nblocks() const { return static_cast<int>(grid.x * grid.y * grid.z); }

  void fail(const std::string& msg) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (error.empty()) error = msg;
      aborted = true;
    }
    cv.notify_all();
  }

  // Baton: wait until block `b` may run (always, when blocks run concurrently).
  void acquire(int b) {
    if (!coop || !baton) return;
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return aborted.load() || order[turn] == b; });
  }
  void pass_baton_locked() {
    if (coop && baton && turn + 1 < order.size()) ++turn;
  }
  void block_finished(int b, int waiting_at_grid) {
    (void)b;
    std::unique_lock<std::mutex> lock(mu);
    ++finished;
    if (arrived > 0 || waiting_at_grid > 0) {
      lock.unlock();
      fail("a block exited while other blocks wait at grid.sync() (every block of a cooperative grid must reach it)");
      return;
    }
    pass_baton_locked();
    lock.unlock();
    cv.notify_all();
  }
  // grid.sync() of block b (all its live threads have arrived). Returns false when the launch aborted.
  bool grid_sync(int b) {
    std::unique_lock<std::mutex> lock(mu);
    if (finished > 0) {
      lock.unlock();
      fail("grid.sync() after a block of the grid exited");
      return false;
    }
    const unsigned g = gen;
    if (++arrived == nblocks()) {
      arrived = 0;
      ++gen;
      turn = 0;
    } else {
      pass_baton_locked();
    }
    cv.notify_all();
    cv.wait(lock, [&] { return aborted.load() || gen != g; });
    lock.unlock();
    if (aborted) return false;
    acquire(b);
    return !aborted;
  }
};

// ------------------------------------------------------------------------------------------------
// fiber stacks: one set of `n` stacks per running block, reused across launches

struct Stacks {
  char* base = nullptr;
  size_t bytes = 0;
  int n = 0;
  char* stack(int i) const { return base + static_cast<size_t>(i) * (kStackBytes + 4096) + 4096; }
};

inline Stacks take_stacks(int n) {
  Global& G = global();
  {
    std::lock_guard<std::mutex> lock(G.mu);
    for (size_t i = 0; i < G.free_stacks.size(); ++i) {
      if (G.free_stacks[i].second >= static_cast<size_t>(n) * (kStackBytes + 4096)) {
        Stacks s{static_cast<char*>(G.free_stacks[i].first), G.free_stacks[i].second, n};
        G.free_stacks.erase(G.free_stacks.begin() + static_cast<long>(i));
        return s;
      }
    }
  }
  const size_t bytes = static_cast<size_t>(kMaxThreadsPerBlock) * (kStackBytes + 4096);
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) fatal("mmap of fiber stacks failed");
  Stacks s{static_cast<char*>(p), bytes, n};
  for (int i = 0; i < kMaxThreadsPerBlock; ++i) mprotect(s.stack(i) - 4096, 4096, PROT_NONE);  // guard pages
  return s;
}

inline void give_stacks(const Stacks& s) {
  Global& G = global();
  std::lock_guard<std::mutex> lock(G.mu);
  G.free_stacks.emplace_back(s.base, s.bytes);
}

// ------------------------------------------------------------------------------------------------
// scheduling

inline void push_ready(Block& B, int i) {
  B.ready.push_back(i);
  (*B.fibers)[i].st = FiberState::Ready;
}

// Make every fiber in state `from` ready, in the policy's wake order.
inline void wake_all(Block& B, FiberState from) {
  std::vector<Fiber>& F = *B.fibers;
  const int nw = (B.nthreads + kWarpSize - 1) / kWarpSize;
  std::vector<int> warp_order(nw);
  for (int w = 0; w < nw; ++w) warp_order[w] = w;
  if (B.policy == 3) std::shuffle(warp_order.begin(), warp_order.end(), B.rng);
  for (int w : warp_order)
    for (int i = w * kWarpSize; i < std::min(B.nthreads, (w + 1) * kWarpSize); ++i)
      if (F[i].st == from) push_ready(B, i);
}

inline int pick(Block& B) {
  switch (B.policy) {
    case 0: {  // FIFO
      const int i = B.ready[B.ready_head++];
      if (B.ready_head == B.ready.size()) {
        B.ready.clear();
        B.ready_head = 0;
      }
      return i;
    }
    case 2: {  // random
      std::uniform_int_distribution<size_t> d(0, B.ready.size() - 1);
      const size_t k = d(B.rng);
      const int i = B.ready[k];
      B.ready[k] = B.ready.back();
      B.ready.pop_back();
      return i;
    }
    default: {  // LIFO
      const int i = B.ready.back();
      B.ready.pop_back();
      return i;
    }
  }
}

inline bool ready_empty(const Block& B) { return B.ready.size() == B.ready_head; }

// Called on a fiber: give control back to the block's scheduler.
inline void yield_fiber() {
  Block* B = tl_block;
  Fiber* f = B->cur;
  if (!_setjmp(f->jb)) _longjmp(B->sched, 1);
}

// Called on a fiber that found an error: stop the launch; this fiber never runs again.
[[noreturn]] inline void fail_here(const std::string& msg) {
  Block* B = tl_block;
  char where[96];
  std::snprintf(where, sizeof where, " [block (%u,%u,%u) thread (%u,%u,%u)]", B->bid.x, B->bid.y, B->bid.z,
                B->cur->tid.x, B->cur->tid.y, B->cur->tid.z);
  B->L->fail(msg + where);
  B->cur->st = FiberState::Done;
  _longjmp(B->sched, 1);
}

inline void fiber_main() {
  Block* B = tl_block;
  B->L->body();
  B = tl_block;  // same OS thread, but reload after the call
  Fiber* f = B->cur;
  f->st = FiberState::Done;
  ++B->exited;
  const int w = f->lin / kWarpSize;
  if (B->warps[w].arrived > 0) {
    char buf[256];
    std::snprintf(buf, sizeof buf, "thread %d exited while lanes of its warp wait at %s (%s:%d)", f->lin,
                  B->warps[w].what, B->warps[w].file, B->warps[w].line);
    B->L->fail(buf);
  } else if (B->at_barrier > 0) {
    char buf[256];
    std::snprintf(buf, sizeof buf, "thread %d exited while %d threads wait at __syncthreads() (%s:%d)", f->lin,
                  B->at_barrier, B->bar_file, B->bar_line);
    B->L->fail(buf);
  } else if (B->at_grid > 0) {
    B->L->fail("a thread exited while other threads of its block wait at grid.sync()");
  }
  _longjmp(B->sched, 1);
}

inline std::string describe_deadlock(const Block& B) {
  int bar = 0, shf = 0, grd = 0;
  for (int i = 0; i < B.nthreads; ++i) {
    const FiberState s = (*B.fibers)[i].st;
    bar += s == FiberState::AtBarrier;
    shf += s == FiberState::AtShuffle;
    grd += s == FiberState::AtGrid;
  }
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "deadlock in block (%u,%u,%u): %d threads at __syncthreads(), %d at a warp shuffle, %d at grid.sync(), "
                "%d exited (divergent barrier)",
                B.bid.x, B.bid.y, B.bid.z, bar, shf, grd, B.exited);
  return buf;
}

// Runs block `lin` of launch L on this OS thread.
inline void run_block(Launch& L, int lin, std::vector<Fiber>& fibers, const Stacks& stacks) {
  Block B;
  B.L = &L;
  B.lin = lin;
  B.bid = uint3{lin % L.grid.x, (lin / L.grid.x) % L.grid.y, lin / (L.grid.x * L.grid.y)};
  B.nthreads = static_cast<int>(L.block.x * L.block.y * L.block.z);
  B.fibers = &fibers;
  B.warps.assign((B.nthreads + kWarpSize - 1) / kWarpSize, WarpRendezvous{});
  B.policy = L.mode;
  B.rng.seed(L.seed * 7919u + static_cast<unsigned>(L.index) * 104729u + static_cast<unsigned>(lin) * 31u + 1u);
  B.ready.reserve(B.nthreads);
  static thread_local ucontext_t proto;
  static thread_local bool have_proto = false;
  if (!have_proto) {
    getcontext(&proto);
    have_proto = true;
  }
  for (int i = 0; i < B.nthreads; ++i) {
    Fiber& f = fibers[i];
    f.lin = i;
    f.tid = uint3{i % L.block.x, (i / L.block.x) % L.block.y, i / (L.block.x * L.block.y)};
    f.st = FiberState::Fresh;
    f.started = false;
    f.stack = stacks.stack(i);
    f.uc = proto;
    f.uc.uc_stack.ss_sp = f.stack;
    f.uc.uc_stack.ss_size = kStackBytes;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, fiber_main, 0);
  }
  tl_block = &B;
  blockIdx = B.bid;
  blockDim = L.block;
  gridDim = L.grid;
  wake_all(B, FiberState::Fresh);
  L.acquire(lin);
  while (!L.aborted) {
    if (ready_empty(B)) {
      if (B.exited == B.nthreads) break;
      if (B.at_grid > 0 && B.at_grid + B.exited == B.nthreads) {
        if (B.exited > 0) {
          L.fail("grid.sync() reached after threads of the block exited");
          break;
        }
        if (!L.grid_sync(lin)) break;
        B.at_grid = 0;
        wake_all(B, FiberState::AtGrid);
        continue;
      }
      L.fail(describe_deadlock(B));
      break;
    }
    const int i = pick(B);
    Fiber& f = fibers[i];
    B.cur = &f;
    threadIdx = f.tid;
    f.st = FiberState::Running;
    if (!_setjmp(B.sched)) {
      if (!f.started) {
        f.started = true;
        setcontext(&f.uc);
      }
      _longjmp(f.jb, 1);
    }
    // back on the scheduler: the fiber yielded, exited or failed
  }
  tl_block = nullptr;
  L.block_finished(lin, B.at_grid);
}

// ------------------------------------------------------------------------------------------------
// synchronization primitives (called on fibers)

inline void syncthreads_at(const char* file, int line) {
  Block* B = tl_block;
  if (!B) fatal("__syncthreads() outside a kernel");
  if (B->exited > 0) {
    char buf[256];
    std::snprintf(buf, sizeof buf, "__syncthreads() at %s:%d after %d threads of the block exited", file, line,
                  B->exited);
    fail_here(buf);
  }
  if (B->at_barrier == 0) {
    B->bar_file = file;
    B->bar_line = line;
  } else if (B->bar_line != line || std::strcmp(B->bar_file, file) != 0) {
    char buf[512];
    std::snprintf(buf, sizeof buf, "divergent __syncthreads(): this thread is at %s:%d, %d others at %s:%d", file,
                  line, B->at_barrier, B->bar_file, B->bar_line);
    fail_here(buf);
  }
  B->cur->st = FiberState::AtBarrier;
  if (++B->at_barrier == B->nthreads) {
    B->at_barrier = 0;
    wake_all(*B, FiberState::AtBarrier);
  }
  yield_fiber();
}

// Warp exchange: every lane deposits `v`; returns the value of lane src(lane) (own value when out of range).
template <class T, class Src>
inline T warp_exchange(unsigned mask, T v, Src src, const char* what, const char* file, int line) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type wider than 64 bit");
  Block* B = tl_block;
  if (!B) fatal("warp shuffle outside a kernel");
  Fiber* f = B->cur;
  const int lane = f->lin % kWarpSize;
  const int w = f->lin / kWarpSize;
  const int lanes = std::min(kWarpSize, B->nthreads - w * kWarpSize);
  const unsigned full = lanes == kWarpSize ? 0xffffffffu : ((1u << lanes) - 1u);
  if (mask != full) {
    char buf[256];
    std::snprintf(buf, sizeof buf, "%s with mask 0x%08x at %s:%d: the emulation supports full-warp masks only (0x%08x)",
                  what, mask, file, line, full);
    fail_here(buf);
  }
  WarpRendezvous& W = B->warps[w];
  if (W.arrived == 0) {
    W.what = what;
    W.file = file;
    W.line = line;
  } else if (W.line != line || std::strcmp(W.file, file) != 0) {
    char buf[512];
    std::snprintf(buf, sizeof buf, "divergent %s: lane %d at %s:%d, %d lanes at %s:%d", what, lane, file, line,
                  W.arrived, W.file, W.line);
    fail_here(buf);
  }
  const unsigned g = W.gen;
  uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  W.buf[g & 1][lane] = raw;
  f->st = FiberState::AtShuffle;
  if (++W.arrived == lanes) {
    W.arrived = 0;
    ++W.gen;
    for (int i = w * kWarpSize; i < w * kWarpSize + lanes; ++i)
      if ((*B->fibers)[i].st == FiberState::AtShuffle) push_ready(*B, i);
  }
  yield_fiber();
  const int s = src(lane);
  T r = v;
  if (s >= 0 && s < lanes) std::memcpy(&r, &W.buf[g & 1][s], sizeof(T));
  return r;
}

inline void grid_sync_here() {
  Block* B = tl_block;
  if (!B) fatal("grid.sync() outside a kernel");
  if (!B->L->coop) fail_here("grid.sync() in a kernel that was not launched cooperatively (cudaLaunchCooperativeKernel / cudaLaunchAttributeCooperative)");
  B->cur->st = FiberState::AtGrid;
  ++B->at_grid;
  yield_fiber();
}

// ------------------------------------------------------------------------------------------------
// launches

inline void set_error(cudaError_t e, const std::string& text) {
  Global& G = global();
  std::lock_guard<std::mutex> lock(G.mu);
  G.last_error = e;
  if (!text.empty() && G.error_text.empty()) G.error_text = text;
}

inline cudaError_t run_launch(dim3 grid, dim3 block, bool coop, std::function<void()> body) {
  Global& G = global();
  Device dev;
  unsigned seed;
  long index;
  {
    std::lock_guard<std::mutex> lock(G.mu);
    dev = G.devices[G.current];
    seed = G.seed;
    index = G.launches++;
    G.coop_launches += coop;
    G.last_grid = static_cast<int>(grid.x * grid.y * grid.z);
  }
  const long nb = static_cast<long>(grid.x) * grid.y * grid.z;
  const long nt = static_cast<long>(block.x) * block.y * block.z;
  if (nb <= 0 || nt <= 0 || nt > kMaxThreadsPerBlock) {
    set_error(cudaErrorInvalidValue, "invalid launch configuration (empty grid or block, or more than 1024 threads)");
    return cudaErrorInvalidValue;
  }
  if (coop && (!dev.coop || nb > static_cast<long>(dev.sms) * dev.blocks_per_sm)) {
    const cudaError_t e = dev.coop ? cudaErrorCooperativeLaunchTooLarge : cudaErrorNotSupported;
    set_error(e, dev.coop ? "cooperative grid larger than the device can hold resident" : "no cooperative launch on this device");
    return e;
  }
  Launch L;
  L.grid = grid;
  L.block = block;
  L.coop = coop;
  L.body = std::move(body);
  L.seed = seed;
  L.mode = static_cast<int>(seed % 4);
  L.index = index;
  L.baton = L.mode != 3;
  L.order.resize(nb);
  for (long i = 0; i < nb; ++i) L.order[i] = static_cast<int>(i);
  if (L.mode == 1) std::reverse(L.order.begin(), L.order.end());
  if (L.mode == 2) {
    std::mt19937 rng(seed * 2654435761u + static_cast<unsigned>(index));
    std::shuffle(L.order.begin(), L.order.end(), rng);
  }
  auto worker = [&](std::function<int()> next) {
    Stacks st = take_stacks(static_cast<int>(nt));
    std::vector<Fiber> fibers(nt);
    for (int b = next(); b >= 0 && !L.aborted; b = next()) run_block(L, b, fibers, st);
    give_stacks(st);
  };
  if (coop) {
    std::vector<std::thread> ts;
    ts.reserve(nb);
    for (long b = 0; b < nb; ++b) {
      ts.emplace_back([&, b] {
        bool done = false;
        worker([&] {
          if (done) return -1;
          done = true;
          return static_cast<int>(b);
        });
      });
    }
    for (auto& t : ts) t.join();
  } else {
    std::atomic<long> pos{0};
    auto next = [&] {
      const long k = pos++;
      return k < nb ? L.order[k] : -1;
    };
    const int nw = L.baton ? 1 : static_cast<int>(std::min<long>(nb, 4));
    std::vector<std::thread> ts;
    for (int i = 0; i < nw; ++i) ts.emplace_back([&] { worker(next); });
    for (auto& t : ts) t.join();
  }
  if (L.aborted) {
    set_error(cudaErrorLaunchFailure, L.error);
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

template <class... P, class... A>
inline cudaError_t launch_fn(dim3 grid, dim3 block, bool coop, void (*fn)(P...), A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel argument count");
  auto params = std::make_shared<std::tuple<std::decay_t<P>...>>(std::forward<A>(args)...);
  return run_launch(grid, block, coop, [fn, params] { std::apply(fn, *params); });
}

// `kernel<<<grid, block, smem, stream>>>(args...)` is rewritten to `Launcher(grid, block, smem, stream)(kernel, args...)`.
struct Launcher {
  dim3 grid, block;
  explicit Launcher(dim3 g, dim3 b, size_t smem = 0, cudaStream_t s = nullptr) : grid(g), block(b) {
    (void)s;
    if (smem != 0) fatal("dynamic shared memory is not emulated");
  }
  template <class F, class... A>
  void operator()(F fn, A&&... args) const {
    const cudaError_t e = launch_fn(grid, block, false, fn, std::forward<A>(args)...);
    if (e != cudaSuccess) set_error(e, "");
  }
};

}  // namespace fusedlars_emu

// ------------------------------------------------------------------------------------------------
// CUDA runtime API subset used by csrc/cuda

inline cudaError_t cudaGetLastError() {
  auto& G = fusedlars_emu::global();
  std::lock_guard<std::mutex> lock(G.mu);
  const cudaError_t e = G.last_error;
  G.last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() {
  auto& G = fusedlars_emu::global();
  std::lock_guard<std::mutex> lock(G.mu);
  return G.last_error;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulation: see emu_last_error)";
    case cudaErrorCooperativeLaunchTooLarge: return "too many blocks in cooperative launch";
    case cudaErrorNotSupported: return "operation not supported";
    default: return "emulated CUDA error";
  }
}
inline cudaError_t cudaGetDevice(int* d) {
  auto& G = fusedlars_emu::global();
  std::lock_guard<std::mutex> lock(G.mu);
  *d = G.current;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {
  auto& G = fusedlars_emu::global();
  std::lock_guard<std::mutex> lock(G.mu);
  if (d < 0 || d >= static_cast<int>(G.devices.size())) return cudaErrorInvalidDevice;
  G.current = d;
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceCount(int* n) {
  auto& G = fusedlars_emu::global();
  std::lock_guard<std::mutex> lock(G.mu);
  *n = static_cast<int>(G.devices.size());
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int dev) {
  auto& G = fusedlars_emu::global();
  std::lock_guard<std::mutex> lock(G.mu);
  if (dev < 0 || dev >= static_cast<int>(G.devices.size())) return cudaErrorInvalidDevice;
  switch (a) {
    case cudaDevAttrMultiProcessorCount: *v = G.devices[dev].sms; return cudaSuccess;
    case cudaDevAttrCooperativeLaunch: *v = G.devices[dev].coop; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
template <class F>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F, int block_size, size_t smem) {
  if (block_size <= 0 || block_size > fusedlars_emu::kMaxThreadsPerBlock || smem != 0) return cudaErrorInvalidValue;
  auto& G = fusedlars_emu::global();
  std::lock_guard<std::mutex> lock(G.mu);
  *n = G.devices[G.current].blocks_per_sm;
  return cudaSuccess;
}
inline cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* st) {
  *st = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
template <class... P, class... A>
inline cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*fn)(P...), A&&... args) {
  bool coop = false;
  for (unsigned i = 0; i < cfg->numAttrs; ++i)
    if (cfg->attrs[i].id == cudaLaunchAttributeCooperative && cfg->attrs[i].val.cooperative) coop = true;
  if (cfg->dynamicSmemBytes != 0) return cudaErrorInvalidValue;
  const cudaError_t e = fusedlars_emu::launch_fn(cfg->gridDim, cfg->blockDim, coop, fn, std::forward<A>(args)...);
  if (e != cudaSuccess) cudaGetLastError();  // returned here, not left sticky
  return e;
}

// ------------------------------------------------------------------------------------------------
// device-side intrinsics and qualifiers

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T>
inline T __shfl_down_sync_at(unsigned mask, T v, unsigned delta, const char* file, int line) {
  return fusedlars_emu::warp_exchange(mask, v, [delta](int lane) { return lane + static_cast<int>(delta); },
                                      "__shfl_down_sync", file, line);
}
template <class T>
inline T __shfl_up_sync_at(unsigned mask, T v, unsigned delta, const char* file, int line) {
  return fusedlars_emu::warp_exchange(mask, v, [delta](int lane) { return lane - static_cast<int>(delta); },
                                      "__shfl_up_sync", file, line);
}
template <class T>
inline T __shfl_xor_sync_at(unsigned mask, T v, int lane_mask, const char* file, int line) {
  return fusedlars_emu::warp_exchange(mask, v, [lane_mask](int lane) { return lane ^ lane_mask; }, "__shfl_xor_sync",
                                      file, line);
}
template <class T>
inline T __shfl_sync_at(unsigned mask, T v, int src, const char* file, int line) {
  return fusedlars_emu::warp_exchange(mask, v, [src](int) { return src & 31; }, "__shfl_sync", file, line);
}

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __constant__
#define __syncthreads() ::fusedlars_emu::syncthreads_at(__FILE__, __LINE__)
#define __shfl_down_sync(m, v, d) __shfl_down_sync_at((m), (v), (d), __FILE__, __LINE__)
#define __shfl_up_sync(m, v, d) __shfl_up_sync_at((m), (v), (d), __FILE__, __LINE__)
#define __shfl_xor_sync(m, v, d) __shfl_xor_sync_at((m), (v), (d), __FILE__, __LINE__)
#define __shfl_sync(m, v, s) __shfl_sync_at((m), (v), (s), __FILE__, __LINE__)
