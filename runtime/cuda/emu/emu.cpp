// emu.cpp - the block runner of the CUDA emulation (run_emu.sh only).
#include "cuda_runtime.h"
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
emu_block *emu_cur;
std::vector<char> emu_dyn_smem;
std::mutex emu_atomic_mu;
// One launch at a time: the block state above is global, and
// test_model_cuda runs its tp ranks as host threads that launch at once.
static std::mutex emu_launch_mu;
void emu_launch(dim3 grid, dim3 block, size_t smem, std::function<void()> body)
{
    emu_sync_all();   // queued copies land before the kernel reads
    std::lock_guard<std::mutex> one_launch(emu_launch_mu);
    blockDim = block; gridDim = grid;
    int nt = block.x * block.y * block.z;
    emu_dyn_smem.assign(smem + 16, 0);
    for (unsigned bz = 0; bz < grid.z; bz++) for (unsigned by = 0; by < grid.y; by++) for (unsigned bx = 0; bx < grid.x; bx++) {
        emu_block b;
        b.bar = std::make_unique<std::barrier<>>(nt);
        for (int w = 0; w < (nt + 31) / 32; w++) b.warp_bar.push_back(std::make_unique<std::barrier<>>(std::min(32, nt - 32 * w)));
        b.xchg.assign(nt, 0);
        emu_cur = &b;
        std::vector<std::thread> th;
        for (int t = 0; t < nt; t++)
            th.emplace_back([&, t] {
                threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
                blockIdx = dim3(bx, by, bz);
                body();
                b.warp_bar[t / 32]->arrive_and_drop();
                b.bar->arrive_and_drop();
            });
        for (auto &x : th) x.join();
    }
}
