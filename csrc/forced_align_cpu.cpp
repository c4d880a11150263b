// CPU implementation of narvl::ctc_forced_align: the Viterbi (best) path through the CTC lattice
// of each sample, as torchaudio.functional.forced_align computes it for a batch of one.
//
// Lattice state s of sample b (width W = 2L + 1) is blank for even s and label (s - 1) / 2 for
// odd s. With a = the best score of a path prefix:
//
//   a_t(s) = max(a_{t-1}(s), a_{t-1}(s-1), [skip(s)] a_{t-1}(s-2)) + lp_t(label(s))
//
// where skip(s) holds for an odd s >= 3 whose label differs from the previous label. Only the
// states of the window of frame t are computed; the others hold -inf:
//   reach(s) <= t + 1        (the fewest frames that reach s from frame 0, s included), and
//   need(s)  <= T_b - t      (the fewest frames from s, s included, to the end of the lattice),
// which is exactly the set torchaudio's start/end pointers sweep.
//
// Ties (the rule of torchaudio's CPU kernel, src/libtorchaudio/forced_align/cpu/compute.cpp):
// a predecessor is taken over a higher one only when its score is strictly greater (s-2 must
// beat both others, s-1 must beat s), so equal scores keep the highest state; the path ends in
// the final blank only when it scores strictly more than the last label. Comparisons with NaN
// are false, so a NaN score loses every comparison it is the challenger in. When that rule
// picks a predecessor outside the window of frame t - 1 (possible only when every candidate is
// -inf or NaN), the back-pointer takes the next lower predecessor instead, so the backtrack
// stays on the lattice and the alignment always collapses to the target.
//
// A sample whose target needs more frames than it has (target length + adjacent repeats) has no
// path: it comes back all blank with -inf scores on its frames (the Python API raises before).
// One sample per task of at::parallel_for; back-pointers take one int8 per (frame, state).
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/torch.h>

#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace narvl {
namespace {

using torch::Tensor;

struct AlignScratch {
  std::vector<int64_t> label, reach, need;
  std::vector<uint8_t> skip;
  std::vector<int8_t> back;
};

template <typename acc_t>
std::vector<acc_t>& alpha_buffer(int which) {
  static thread_local std::vector<acc_t> bufs[2];
  return bufs[which];
}

AlignScratch& thread_scratch() {
  static thread_local AlignScratch s;
  return s;
}

// The lattice of one sample: labels, skip flags and the window bounds reach / need.
void build_lattice(const int64_t* tgt, int64_t L, int64_t blank, AlignScratch& z) {
  const int64_t W = 2 * L + 1;
  z.label.assign(W, blank);
  z.skip.assign(W, 0);
  z.reach.assign(W, 0);
  z.need.assign(W, 0);
  for (int64_t k = 0; k < L; ++k) {
    z.label[2 * k + 1] = tgt[k];
    z.skip[2 * k + 1] = k > 0 && tgt[k] != tgt[k - 1];
  }
  // reach: a blank is one frame past the label before it; a label one frame past the previous
  // label when it differs from it, two (through the blank) when it repeats it.
  z.reach[0] = 1;
  if (W > 1) z.reach[1] = 1;
  for (int64_t s = 2; s < W; ++s)
    z.reach[s] = (s % 2 == 0 || z.skip[s]) ? z.reach[s - 1 - (s % 2)] + 1 : z.reach[s - 1] + 1;
  // need: symmetric, from the end (the last label and the final blank need one frame each).
  z.need[W - 1] = 1;
  if (W > 1) z.need[W - 2] = 1;
  for (int64_t s = W - 3; s >= 0; --s)
    z.need[s] = (s % 2 == 0 || z.skip[s + 2]) ? z.need[s + 1 + (s % 2)] + 1 : z.need[s + 1] + 1;
}

template <typename scalar_t, typename acc_t>
void align_sample(const scalar_t* lp, int64_t C, int64_t Tb, const int64_t* tgt, int64_t L,
                  int64_t blank, int64_t* path, acc_t* score) {
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  AlignScratch& z = thread_scratch();
  build_lattice(tgt, L, blank, z);
  const int64_t W = 2 * L + 1;
  const int64_t* lab = z.label.data();
  const int64_t* reach = z.reach.data();
  const int64_t* need = z.need.data();
  const uint8_t* skip = z.skip.data();
  auto inside = [&](int64_t t, int64_t s) { return reach[s] <= t + 1 && need[s] <= Tb - t; };
  std::vector<acc_t>& prev_v = alpha_buffer<acc_t>(0);
  std::vector<acc_t>& cur_v = alpha_buffer<acc_t>(1);
  prev_v.assign(W, ninf);
  cur_v.assign(W, ninf);
  acc_t* prev = prev_v.data();
  acc_t* cur = cur_v.data();
  z.back.resize(static_cast<size_t>(Tb) * W);
  int8_t* back = z.back.data();

  for (int64_t s = 0; s < W; ++s)
    if (inside(0, s)) prev[s] = static_cast<acc_t>(lp[lab[s]]);
  for (int64_t t = 1; t < Tb; ++t) {
    const scalar_t* row = lp + t * C;
    int8_t* bt = back + t * W;
    for (int64_t s = 0; s < W; ++s) {
      if (!inside(t, s)) {
        cur[s] = ninf;
        continue;
      }
      const acc_t x0 = prev[s];
      const acc_t x1 = s >= 1 ? prev[s - 1] : ninf;
      const acc_t x2 = skip[s] ? prev[s - 2] : ninf;
      acc_t best;
      int8_t step;
      if (x2 > x1 && x2 > x0) {
        best = x2;
        step = 2;
      } else if (x1 > x0) {
        best = x1;
        step = 1;
      } else {
        best = x0;
        step = 0;
        if (!inside(t - 1, s)) step = (s >= 1 && inside(t - 1, s - 1)) ? 1 : 2;
      }
      cur[s] = best + static_cast<acc_t>(row[lab[s]]);
      bt[s] = step;
    }
    std::swap(prev, cur);
  }
  int64_t s = (W > 1 && prev[W - 1] > prev[W - 2]) ? W - 1 : (W > 1 ? W - 2 : 0);
  for (int64_t t = Tb - 1; t >= 0; --t) {
    path[t] = lab[s];
    score[t] = static_cast<acc_t>(lp[t * C + lab[s]]);
    if (t > 0) s -= back[t * W + s];
  }
}

std::tuple<Tensor, Tensor> forced_align_cpu(const Tensor& lp_in, const Tensor& targets_in,
                                            const Tensor& input_lengths_in,
                                            const Tensor& target_lengths_in, int64_t blank) {
  TORCH_CHECK(lp_in.dim() == 3, "narvl: log_probs must be (B, T, C), got ", lp_in.dim(), "-D");
  TORCH_CHECK(lp_in.is_floating_point(), "narvl: log_probs must be floating point");
  const Tensor lp = lp_in.contiguous();
  const int64_t B = lp.size(0), T = lp.size(1), C = lp.size(2);
  TORCH_CHECK(targets_in.dim() == 2 && targets_in.size(0) == B, "narvl: targets must be (B, S)");
  TORCH_CHECK(input_lengths_in.dim() == 1 && input_lengths_in.size(0) == B,
              "narvl: input_lengths must be (B,)");
  TORCH_CHECK(target_lengths_in.dim() == 1 && target_lengths_in.size(0) == B,
              "narvl: target_lengths must be (B,)");
  TORCH_CHECK(C > 0 && blank >= 0 && blank < C, "narvl: blank out of range");
  const Tensor targets = targets_in.to(torch::kLong).contiguous();
  const Tensor il = input_lengths_in.to(torch::kLong).contiguous();
  const Tensor tl = target_lengths_in.to(torch::kLong).contiguous();
  const int64_t S = targets.size(1);
  const auto out_type = lp.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  Tensor paths = torch::full({B, T}, blank, lp.options().dtype(torch::kLong));
  Tensor scores = torch::zeros({B, T}, lp.options().dtype(out_type));
  const int64_t* tg = targets.data_ptr<int64_t>();
  const int64_t* ilp = il.data_ptr<int64_t>();
  const int64_t* tlp = tl.data_ptr<int64_t>();
  int64_t* pp = paths.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lp.scalar_type(), "forced_align_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* X = lp.data_ptr<scalar_t>();
    acc_t* sc = scores.data_ptr<acc_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t Tb = ilp[b], L = tlp[b];
        TORCH_CHECK(Tb >= 0 && Tb <= T, "narvl: input_lengths[", b, "] = ", Tb, " is outside [0, ", T, "]");
        TORCH_CHECK(L >= 0 && L <= S, "narvl: target_lengths[", b, "] = ", L, " is outside [0, ", S, "]");
        const int64_t* tgt = tg + b * S;
        int64_t repeats = 0;
        for (int64_t k = 0; k < L; ++k) {
          TORCH_CHECK(tgt[k] >= 0 && tgt[k] < C && tgt[k] != blank, "narvl: targets[", b, ", ", k,
                      "] = ", tgt[k], " is out of range or blank");
          repeats += k > 0 && tgt[k] == tgt[k - 1];
        }
        if (L + repeats > Tb) {  // no path (the Python API refuses it before the kernel runs)
          for (int64_t t = 0; t < Tb; ++t) sc[b * T + t] = -std::numeric_limits<acc_t>::infinity();
          continue;
        }
        if (Tb == 0) continue;
        align_sample<scalar_t, acc_t>(X + b * T * C, C, Tb, tgt, L, blank, pp + b * T, sc + b * T);
      }
    });
  });
  return {paths, scores};
}

}  // namespace

// The CPU kernel of narvl::ctc_forced_align, registered on the op by narvl/ops/forced_align.py;
// it runs without the GIL.
void register_forced_align_kernels(pybind11::module_& m) {
  m.def("ctc_forced_align", &forced_align_cpu, pybind11::call_guard<pybind11::gil_scoped_release>());
}

}  // namespace narvl
