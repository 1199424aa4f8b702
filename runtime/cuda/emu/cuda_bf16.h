#pragma once
// cuda_bf16.h (emulation, run_emu.sh only): round-to-nearest-even bf16.
#include <cstdint>
#include <cstring>
struct __nv_bfloat16 { uint16_t b; };
inline __nv_bfloat16 __float2bfloat16_rn(float f)
{
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return { (uint16_t)((u >> 16) | 0x40) };
    u += 0x7fffu + ((u >> 16) & 1u);
    return { (uint16_t)(u >> 16) };
}
inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 b) { return b.b; }
