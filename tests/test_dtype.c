/*
 * test_dtype.c - the type table and the half-precision conversions.
 * f16: every one of the 65536 bit patterns converts to float and back
 * unchanged (NaNs stay NaN); float -> f16 rounds to nearest even, checked
 * against an independent rounding computed in double. bf16 likewise.
 */
#include "dtype.h"
#include "test.h"

#include <math.h>
#include <stdint.h>

static double f16_exact(uint16_t h) { /* independent decoder, in double */
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    double v = e == 0 ? ldexp(m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexp(1024 + m, e - 25);
    return (h & 0x8000) ? -v : v;
}

int main(void) {
    CHECK(dtype_block_size(DTYPE_Q4_0) == 32 && dtype_type_size(DTYPE_Q4_0) == 18);
    CHECK(dtype_block_size(DTYPE_Q4_K) == 256 && dtype_type_size(DTYPE_Q4_K) == 144);
    CHECK(dtype_block_size(DTYPE_Q6_K) == 256 && dtype_type_size(DTYPE_Q6_K) == 210);
    CHECK(dtype_type_size(DTYPE_BF16) == 2 && dtype_from_name("BF16") == DTYPE_BF16);
    CHECK(!dtype_is_known(4) && !dtype_is_known(5) && !dtype_is_known(1000));
    uint64_t sz = 0;
    CHECK(dtype_row_size(DTYPE_Q8_0, 64, &sz) && sz == 68);
    CHECK(!dtype_row_size(DTYPE_Q8_0, 65, &sz));
    CHECK(!dtype_row_size(DTYPE_F32, UINT64_MAX / 2, &sz));

    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = f16_to_f32((f16_t)h);
        double ref = f16_exact((uint16_t)h);
        if (isnan(ref)) {
            bad += !isnan(f) || !((f32_to_f16(f) & 0x7c00) == 0x7c00 && (f32_to_f16(f) & 0x3ff));
            continue;
        }
        bad += (double)f != ref || f32_to_f16(f) != h;
    }
    CHECK(bad == 0, "%d f16 bit patterns failed the round trip", bad);

    /* rounding: halfway cases go to even, just above goes up */
    CHECK(f32_to_f16(1.0f + ldexpf(1.0f, -11)) == 0x3c00); /* tie -> even (down) */
    CHECK(f32_to_f16(1.0f + 3 * ldexpf(1.0f, -11)) == 0x3c02); /* tie -> even (up) */
    CHECK(f32_to_f16(65520.0f) == 0x7c00 && f32_to_f16(65504.0f) == 0x7bff);
    CHECK(f32_to_f16(ldexpf(1.0f, -25)) == 0x0000); /* tie at the smallest subnormal -> 0 */
    CHECK(f32_to_f16(ldexpf(1.5f, -25)) == 0x0001);

    /* random floats: result is the nearest f16 (ties to even) */
    uint64_t x = 0x12345678;
    int bad_round = 0;
    for (int i = 0; i < 200000; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        float f = ldexpf((float)((x >> 40) & 0xffffff) / 16777216.0f, (int)((x >> 20) % 40) - 26);
        if (x & 1) f = -f;
        uint16_t h = f32_to_f16(f);
        double err = fabs(f16_exact(h) - f);
        double lo = fabs(f16_exact((uint16_t)(h - 1)) - f), hi = fabs(f16_exact((uint16_t)(h + 1)) - f);
        if ((h & 0x7fff) != 0 && err > lo) bad_round++;
        if ((h & 0x7fff) < 0x7bff && err > hi) bad_round++;
    }
    CHECK(bad_round == 0, "%d values not rounded to nearest f16", bad_round);

    int bad_bf = 0;
    for (uint32_t b = 0; b < 65536; b++) {
        float f = bf16_to_f32((bf16_t)b);
        if (isnan(f)) continue;
        bad_bf += f32_to_bf16(f) != b;
    }
    CHECK(bad_bf == 0, "%d bf16 patterns failed the round trip", bad_bf);
    CHECK(f32_to_bf16(1.0f + ldexpf(1.0f, -8)) == 0x3f80);  /* tie -> even */
    CHECK(f32_to_bf16(1.0f + 3 * ldexpf(1.0f, -8)) == 0x3f82);
    CHECK(isnan(bf16_to_f32(f32_to_bf16(NAN))));
    return test_summary("test_dtype");
}
