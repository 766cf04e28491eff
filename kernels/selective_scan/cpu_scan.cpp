// The core of the selective scan for the CPU, forward and backward: per (batch, channel), one sequential pass over
// L with the state (N values) in a small buffer that stays in L1, so exp(ΔA), ΔBu and the states never go to memory:
//     h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t u_t B_t,   y_t = C_t · h_t,   h_{-1} = 0
// Δ arrives after bias and softplus; the skip D u and the silu(z) gate are (Bt, D, L) elementwise ops left to
// PyTorch. Built on first use by compiled.py (plain C ABI, loaded with ctypes, no torch headers: it compiles in about
// a second) and wrapped there in a torch.autograd.Function.
//
// Layouts (all contiguous, one dtype T = float or double):
//   u, delta, out, dout, du, ddelta: (Bt, D, L)    A: (D, N)
//   B, C: (Bt, G, L, N), time-major so a step's N values are contiguous and the loops over n vectorize
//   last_state, dlast (null when not needed), dA_part: (Bt, D, N)
//   dB_part, dC_part: (Bt, G, P, L, N), zero-filled by the caller, who sums the P channel partitions of each group:
//   threads never write the same element.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// exp for float as straight-line arithmetic so that loops over n vectorize (std::exp is a library call that does
// not): Cephes expf, x = k ln2 + r with |r| <= ln2 / 2, a degree-7 polynomial for e^r, 2^k built in the exponent
// bits. Error about 1 ulp over the normal range; results below 2^-126 flush to 0 (the reference gives a subnormal).
// 2^k is built as 2^(k/2) · 2^(k - k/2): at the top of the range k = 128, whose own exponent bits would be inf.
inline float exp_vec(float x) {
    const float lo = -87.3365448f, hi = 88.7228391f;  // ln of the smallest normal float, ln FLT_MAX
    float xc = x < lo ? lo : (x > hi ? hi : x);
    // Round to nearest by the 1.5 * 2^23 trick (exact in float; a plain add, so it vectorizes without SSE4.1).
    float kf = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = xc - kf * 0.693359375f;
    r = r - kf * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t k = static_cast<int32_t>(kf);
    int32_t k1 = k >> 1, k2 = k - k1;  // each in [-63, 64]: normal floats
    int32_t bits1 = (k1 + 127) << 23, bits2 = (k2 + 127) << 23;
    float scale1, scale2;
    std::memcpy(&scale1, &bits1, sizeof scale1);
    std::memcpy(&scale2, &bits2, sizeof scale2);
    float res = p * scale1 * scale2;
    res = x < lo ? 0.0f : res;
    res = x > hi ? INFINITY : res;
    return x != x ? x : res;  // NaN in, NaN out
}

inline double exp_vec(double x) { return std::exp(x); }

struct Shape {
    int64_t batch, dim, L, N, groups;
};

// Runs body(begin, end) over [0, n) split into contiguous ranges, one per thread. OpenMP rather than std::thread:
// the library links libgomp.so.1, which resolves to the copy PyTorch has already loaded (same soname, as in the pip
// wheels), so this region runs on PyTorch's own intra-op threads. Threads of a second pool compete with PyTorch's,
// which spin for milliseconds after each parallel op (std::thread at 2 threads on 2 cores: 2x slower after one).
template <typename F>
void parallel_for(int64_t n, int nthreads, F body) {
    const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(nthreads, n));
#ifdef _OPENMP
#pragma omp parallel num_threads(static_cast<int>(workers)) if (workers > 1)
    {
        const int64_t w = omp_get_thread_num(), count = omp_get_num_threads();
        body(n * w / count, n * (w + 1) / count);
    }
#else
    (void)workers;
    body(int64_t(0), n);
#endif
}

template <typename T>
void scan_fwd(const T* u, const T* delta, const T* A, const T* B, const T* C, Shape s, T* out, T* last_state,
              int nthreads) {
    const int64_t L = s.L, N = s.N, H = s.dim / s.groups;
    parallel_for(s.batch * s.dim, nthreads, [&](int64_t begin, int64_t end) {
        std::vector<T> state(N);
        for (int64_t row = begin; row < end; ++row) {
            const int64_t b = row / s.dim, d = row % s.dim;
            const T* __restrict__ Ad = A + d * N;
            const T* __restrict__ Bg = B + (b * s.groups + d / H) * L * N;
            const T* __restrict__ Cg = C + (b * s.groups + d / H) * L * N;
            const T* ur = u + row * L;
            const T* dr = delta + row * L;
            T* __restrict__ h = state.data();
            std::fill(h, h + N, T(0));
            for (int64_t t = 0; t < L; ++t) {
                const T dt = dr[t], dtu = dt * ur[t];
                const T* __restrict__ Bt = Bg + t * N;
                const T* __restrict__ Ct = Cg + t * N;
                T y = 0;
#pragma omp simd reduction(+ : y)
                for (int64_t n = 0; n < N; ++n) {
                    h[n] = exp_vec(dt * Ad[n]) * h[n] + dtu * Bt[n];
                    y += h[n] * Ct[n];
                }
                out[row * L + t] = y;
            }
            std::copy(h, h + N, last_state + row * N);
        }
    });
}

// Backward per (batch, channel): recompute the L states and decays forward into a per-thread buffer, then walk
// back with the adjoint g_t = dL/dh_t = C_t dy_t + exp(Δ_{t+1} A) g_{t+1} (started from dL/dlast_state).
template <typename T>
void scan_bwd(const T* u, const T* delta, const T* A, const T* B, const T* C, Shape s, const T* dout,
              const T* dlast, T* du, T* ddelta, T* dA_part, T* dB_part, T* dC_part, int64_t parts, int nthreads) {
    const int64_t L = s.L, N = s.N, H = s.dim / s.groups;
    // Work item (b, g, p): channels [p H / P, (p + 1) H / P) of group g, which accumulate into dB/dC partition p.
    parallel_for(s.batch * s.groups * parts, nthreads, [&](int64_t begin, int64_t end) {
        std::vector<T> hs((L + 1) * N), decay(L * N), g(N), dAacc(N);
        for (int64_t item = begin; item < end; ++item) {
            const int64_t p = item % parts, bg = item / parts, b = bg / s.groups, grp = bg % s.groups;
            const T* __restrict__ Bg = B + bg * L * N;
            const T* __restrict__ Cg = C + bg * L * N;
            T* __restrict__ dBp = dB_part + item * L * N;
            T* __restrict__ dCp = dC_part + item * L * N;
            for (int64_t d = grp * H + p * H / parts; d < grp * H + (p + 1) * H / parts; ++d) {
                const int64_t row = b * s.dim + d;
                const T* __restrict__ Ad = A + d * N;
                const T* ur = u + row * L;
                const T* dr = delta + row * L;
                const T* gr = dout + row * L;
                T* __restrict__ h = hs.data();  // h + (t + 1) N is the state after step t; row 0 is the zero state
                T* __restrict__ a = decay.data();
                std::fill(h, h + N, T(0));
                for (int64_t t = 0; t < L; ++t) {
                    const T dt = dr[t], dtu = dt * ur[t];
                    const T* __restrict__ Bt = Bg + t * N;
                    const T* __restrict__ hp = h + t * N;
                    T* __restrict__ hn = h + (t + 1) * N;
                    T* __restrict__ at = a + t * N;
#pragma omp simd
                    for (int64_t n = 0; n < N; ++n) {
                        at[n] = exp_vec(dt * Ad[n]);
                        hn[n] = at[n] * hp[n] + dtu * Bt[n];
                    }
                }
                T* __restrict__ gh = g.data();
                T* __restrict__ dAd = dAacc.data();
                for (int64_t n = 0; n < N; ++n) gh[n] = dlast ? dlast[row * N + n] : T(0);
                std::fill(dAd, dAd + N, T(0));
                for (int64_t t = L - 1; t >= 0; --t) {
                    const T dt = dr[t], ut = ur[t], dtu = dt * ut, dy = gr[t];
                    const T* __restrict__ Bt = Bg + t * N;
                    const T* __restrict__ Ct = Cg + t * N;
                    const T* __restrict__ hp = h + t * N;
                    const T* __restrict__ hn = h + (t + 1) * N;
                    const T* __restrict__ at = a + t * N;
                    T* __restrict__ dBt = dBp + t * N;
                    T* __restrict__ dCt = dCp + t * N;
                    T ddt = 0, gB = 0;
#pragma omp simd reduction(+ : ddt, gB)
                    for (int64_t n = 0; n < N; ++n) {
                        const T gn = gh[n] + dy * Ct[n];  // dL/dh_t
                        const T ga = gn * hp[n] * at[n];  // dL/d(Δ_t A_n) through the decay
                        dCt[n] += dy * hn[n];
                        dBt[n] += gn * dtu;
                        dAd[n] += ga * dt;
                        ddt += ga * Ad[n];
                        gB += gn * Bt[n];
                        gh[n] = gn * at[n];
                    }
                    ddt += gB * ut;
                    du[row * L + t] = dt * gB;
                    ddelta[row * L + t] = ddt;
                }
                std::copy(dAd, dAd + N, dA_part + row * N);
            }
        }
    });
}

}  // namespace

extern "C" {

#define SOKHAN_SCAN_ENTRIES(T, suffix)                                                                             \
    void sokhan_scan_fwd_##suffix(const T* u, const T* delta, const T* A, const T* B, const T* C, int64_t batch,  \
                                  int64_t dim, int64_t L, int64_t N, int64_t groups, T* out, T* last_state,       \
                                  int nthreads) {                                                                 \
        scan_fwd<T>(u, delta, A, B, C, Shape{batch, dim, L, N, groups}, out, last_state, nthreads);               \
    }                                                                                                             \
    void sokhan_scan_bwd_##suffix(const T* u, const T* delta, const T* A, const T* B, const T* C, int64_t batch,  \
                                  int64_t dim, int64_t L, int64_t N, int64_t groups, const T* dout,               \
                                  const T* dlast, T* du, T* ddelta, T* dA_part, T* dB_part, T* dC_part,           \
                                  int64_t parts, int nthreads) {                                                  \
        scan_bwd<T>(u, delta, A, B, C, Shape{batch, dim, L, N, groups}, dout, dlast, du, ddelta, dA_part,         \
                    dB_part, dC_part, parts, nthreads);                                                           \
    }

SOKHAN_SCAN_ENTRIES(float, f32)
SOKHAN_SCAN_ENTRIES(double, f64)

}  // extern "C"
