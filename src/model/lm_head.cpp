// lm_head.cpp — see lm_head.h.
//
// With z = h·Wᵀ / T (fp32) and p = softmax(z), per row:
//   log_prob = z[label] − lse(z)            ∂/∂z_j = 1[j = label] − p_j
//   entropy  = lse(z) − Σ p·z                ∂/∂z_j = p_j (Σ p·z − z_j)
// so backward needs only the logits again (recomputed from h and W) and, per row, the saved
// log-sum-exp and Σ p·z; ∂/∂(h·Wᵀ) = ∂/∂z / T, cast to the compute dtype as autograd's own cast
// would. Backward sweeps vocabulary blocks: for a block b, ∂W_b = gᵀ·h is one GEMM over a
// whole row group (one rounding, as autograd through the full logits; no [V, H] accumulation
// per row chunk), and ∂h += g·W_b accumulates in fp32 over the [rows, H] hidden gradient.

#include "model/lm_head.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>

#include "core/error.h"

namespace verl {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

constexpr int64_t kLogitBytes = int64_t(32) << 20;      // fp32 logits per forward chunk
constexpr int64_t kBlockBytes = int64_t(8) << 20;       // fp32 logits per backward block (z, p, dz live together)
constexpr int64_t kMaxGroupRows = 8192;              // backward rows per group

int64_t rows_per_chunk(int64_t vocab, int64_t want) {
  if (want > 0) return want;
  return std::max<int64_t>(32, kLogitBytes / 4 / std::max<int64_t>(1, vocab));
}

// fp32 logits of h's rows against the weight rows w at the rows' temperatures t [rows, 1]
// (undefined: every temperature is 1, and the division is skipped).
at::Tensor logits(const at::Tensor& h, const at::Tensor& w, const at::Tensor& t) {
  at::Tensor z = at::linear(h, w).to(at::kFloat);
  return t.defined() ? z.div_(t) : z;
}

// Σ softmax(z)·z per row: the entropy is lse − this.
at::Tensor expected_logit(const at::Tensor& z) { return (at::softmax(z, -1) * z).sum(-1); }

// The rows' temperatures as logits() takes them.
at::Tensor temp_rows(const at::Tensor& temp, bool unit_temp, int64_t s, int64_t c) {
  return unit_temp ? at::Tensor() : temp.narrow(0, s, c).unsqueeze(1);
}

// Forward over every chunk; `lse_out` / `ez_out` (if defined) receive the per-row log-sum-exp
// and Σ p·z.
HeadOutputs head_forward(const at::Tensor& h, const at::Tensor& w, const at::Tensor& labels, const at::Tensor& temp,
                         bool with_entropy, int64_t chunk, bool unit_temp, const at::Tensor& lse_out,
                         const at::Tensor& ez_out) {
  const int64_t n = h.size(0);
  HeadOutputs o;
  o.log_probs = at::empty({n}, h.options().dtype(at::kFloat));
  if (with_entropy) o.entropy = at::empty({n}, h.options().dtype(at::kFloat));
  for (int64_t s = 0; s < n; s += chunk) {
    const int64_t c = std::min(chunk, n - s);
    at::Tensor z = logits(h.narrow(0, s, c), w, temp_rows(temp, unit_temp, s, c));
    at::Tensor lse = at::logsumexp(z, {1});
    at::Tensor picked = z.gather(1, labels.narrow(0, s, c).unsqueeze(1)).squeeze(1);
    o.log_probs.narrow(0, s, c).copy_(picked - lse);
    if (with_entropy) {
      at::Tensor ez = expected_logit(z);
      o.entropy.narrow(0, s, c).copy_(lse - ez);
      if (ez_out.defined()) ez_out.narrow(0, s, c).copy_(ez);
    }
    if (lse_out.defined()) lse_out.narrow(0, s, c).copy_(lse);
  }
  return o;
}

// The per-row inputs of one backward row group.
struct RowGroup {
  at::Tensor h, labels, temp, lse, ez, gl, ge;  // [r, H] / [r] / [r, 1]
};

// ∂/∂(h·W_bᵀ) of one vocabulary block [v0, v0 + vb) for a row group, in the compute dtype:
// p·((Σp·z − z)·ge − gl), plus gl at each row's label when it lies in the block.
at::Tensor block_grad(const RowGroup& g, const at::Tensor& wb, int64_t v0) {
  at::Tensor z = logits(g.h, wb, g.temp);
  at::Tensor p = (z - g.lse).exp_();
  at::Tensor dz = g.ge.defined() ? z.neg_().add_(g.ez).mul_(g.ge).sub_(g.gl).mul_(p) : p.mul_(g.gl.neg());
  const at::Tensor lab = g.labels - v0;
  const at::Tensor rows = ((lab >= 0) & (lab < wb.size(0))).nonzero().squeeze(1);
  if (rows.numel() > 0) dz.index_put_({rows, lab.index({rows})}, g.gl.squeeze(1).index({rows}), /*accumulate=*/true);
  return dz.to(g.h.scalar_type());
}

struct ChunkedHeadFn : public torch::autograd::Function<ChunkedHeadFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& w, const at::Tensor& labels,
                               const at::Tensor& temp, bool with_entropy, bool unit_temp, std::vector<int64_t> blocks) {
    at::Tensor lse = at::empty({h.size(0)}, h.options().dtype(at::kFloat));
    at::Tensor ez = with_entropy ? at::empty({h.size(0)}, h.options().dtype(at::kFloat)) : at::Tensor();
    HeadOutputs o = head_forward(h, w, labels, temp, with_entropy, blocks[0], unit_temp, lse, ez);
    ctx->save_for_backward({h, w, labels, temp, lse, ez});
    ctx->saved_data["blocks"] = blocks;
    ctx->saved_data["unit_temp"] = unit_temp;
    if (!with_entropy) return {o.log_probs};
    return {o.log_probs, o.entropy};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &h = saved[0], &w = saved[1], &labels = saved[2], &temp = saved[3], &lse = saved[4], &ez = saved[5];
    const std::vector<int64_t> blocks = ctx->saved_data["blocks"].toIntVector();
    const bool unit_temp = ctx->saved_data["unit_temp"].toBool();
    const int64_t n = h.size(0), V = w.size(0), H = h.size(1);
    const at::Tensor g_lp = grads[0];
    const at::Tensor g_ent = grads.size() > 1 ? grads[1] : at::Tensor();
    // Per-row factors with the temperature folded in: ∂/∂(h·Wᵀ) = ∂/∂z / T.
    const at::Tensor gl = g_lp.defined() ? (g_lp / temp).unsqueeze(1) : at::zeros({n, 1}, temp.options());
    const at::Tensor ge = g_ent.defined() ? (g_ent / temp).unsqueeze(1) : at::Tensor();
    const int64_t R = blocks[1] > 0 ? blocks[1] : kMaxGroupRows;
    const bool fp32 = w.scalar_type() == at::kFloat, one_group = n <= R;
    // ∂W in the weight's dtype, written by the first group's GEMMs (later groups add in place:
    // fp32 only); with several groups of a reduced-precision weight, summed in fp32, cast once.
    const bool direct = fp32 || one_group;
    at::Tensor dw = n == 0 ? at::zeros(w.sizes(), w.options())
                    : direct ? at::empty(w.sizes(), w.options())
                             : at::zeros(w.sizes(), w.options().dtype(at::kFloat));
    at::Tensor dh = at::empty_like(h);
    for (int64_t r0 = 0; r0 < n; r0 += R) {
      const int64_t r = std::min(R, n - r0);
      RowGroup g;
      g.h = h.narrow(0, r0, r);
      g.labels = labels.narrow(0, r0, r);
      g.temp = temp_rows(temp, unit_temp, r0, r);
      g.lse = lse.narrow(0, r0, r).unsqueeze(1);
      g.gl = gl.narrow(0, r0, r);
      if (ge.defined()) {
        g.ge = ge.narrow(0, r0, r);
        g.ez = ez.narrow(0, r0, r).unsqueeze(1);
      }
      const int64_t Vb = blocks[2] > 0 ? blocks[2] : std::clamp<int64_t>(kBlockBytes / 4 / r, 64, V);
      at::Tensor dh_acc = at::zeros({r, H}, h.options().dtype(at::kFloat));
      for (int64_t v0 = 0; v0 < V; v0 += Vb) {
        const int64_t vb = std::min(Vb, V - v0);
        const at::Tensor wb = w.narrow(0, v0, vb);
        at::Tensor dwb = dw.narrow(0, v0, vb);
        const at::Tensor gz = block_grad(g, wb, v0);
        if (!direct) dwb.add_(at::mm(gz.t(), g.h));
        else if (r0 == 0) at::mm_out(dwb, gz.t(), g.h);
        else dwb.addmm_(gz.t(), g.h);
        if (fp32) dh_acc.addmm_(gz, wb);
        else dh_acc.add_(at::mm(gz, wb));
      }
      dh.narrow(0, r0, r).copy_(dh_acc);
    }
    return {dh, dw.to(w.scalar_type()), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor logits_entropy(const at::Tensor& z, const at::Tensor& lse) {
  return lse - expected_logit(z);
}

HeadOutputs lm_head_log_probs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                              const at::Tensor& temperature, bool with_entropy, const HeadBlocks& blocks) {
  if (hidden.dim() != 2 || weight.dim() != 2 || hidden.size(1) != weight.size(1))
    fail("lm head: hidden ", hidden.sizes(), " does not match the head weight ", weight.sizes());
  if (labels.numel() != hidden.size(0) || temperature.numel() != hidden.size(0))
    fail("lm head: ", hidden.size(0), " rows but ", labels.numel(), " labels and ", temperature.numel(), " temperatures");
  const int64_t chunk = rows_per_chunk(weight.size(0), blocks.rows);
  const at::Tensor temp = temperature.to(at::kFloat).clamp_min(1e-8);
  const bool grad = at::GradMode::is_enabled() && (hidden.requires_grad() || weight.requires_grad());
  const bool unit_temp = temp.numel() == 0 || temp.eq(1.0).all().item<bool>();
  if (!grad) return head_forward(hidden, weight, labels, temp, with_entropy, chunk, unit_temp, at::Tensor(), at::Tensor());
  variable_list r = ChunkedHeadFn::apply(hidden, weight, labels, temp, with_entropy, unit_temp,
                                         std::vector<int64_t>{chunk, blocks.bwd_rows, blocks.bwd_vocab});
  HeadOutputs o;
  o.log_probs = r[0];
  if (with_entropy) o.entropy = r[1];
  return o;
}

}  // namespace verl
