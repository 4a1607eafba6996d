// lm_head.cpp — see lm_head.h.
//
// With z = h·Wᵀ / T (fp32) and p = softmax(z), per row:
//   log_prob = z[label] − lse(z)            ∂/∂z_j = 1[j = label] − p_j
//   entropy  = lse(z) − Σ p·z                ∂/∂z_j = p_j (Σ p·z − z_j)
// so the backward of a chunk needs only its logits again (recomputed from h and W) and the
// saved log-sum-exp; ∂/∂(h·Wᵀ) = ∂/∂z / T, cast to the compute dtype as autograd's own cast
// would, then ∂h = g·W and ∂W += gᵀ·h (accumulated in fp32 across chunks).
#include "model/lm_head.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>

#include "core/error.h"

namespace verl {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

int64_t rows_per_chunk(int64_t vocab, int64_t want) {
  if (want > 0) return want;
  return std::max<int64_t>(32, (int64_t(8) << 20) / std::max<int64_t>(1, vocab));  // ~32 MB of fp32 logits
}

// fp32 logits of rows [s, s+c) at their temperature.
at::Tensor chunk_logits(const at::Tensor& h, const at::Tensor& w, const at::Tensor& temp, int64_t s, int64_t c) {
  at::Tensor z = at::linear(h.narrow(0, s, c), w).to(at::kFloat);
  return z.div_(temp.narrow(0, s, c).unsqueeze(1));
}

// Forward over every chunk; `lse` (if defined) receives the per-row log-sum-exp.
HeadOutputs head_forward(const at::Tensor& h, const at::Tensor& w, const at::Tensor& labels, const at::Tensor& temp,
                         bool with_entropy, int64_t chunk, const at::Tensor& lse_out) {
  const int64_t n = h.size(0);
  HeadOutputs o;
  o.log_probs = at::empty({n}, h.options().dtype(at::kFloat));
  if (with_entropy) o.entropy = at::empty({n}, h.options().dtype(at::kFloat));
  for (int64_t s = 0; s < n; s += chunk) {
    const int64_t c = std::min(chunk, n - s);
    at::Tensor z = chunk_logits(h, w, temp, s, c);
    at::Tensor lse = at::logsumexp(z, {1});
    at::Tensor picked = z.gather(1, labels.narrow(0, s, c).unsqueeze(1)).squeeze(1);
    o.log_probs.narrow(0, s, c).copy_(picked - lse);
    if (with_entropy) o.entropy.narrow(0, s, c).copy_(logits_entropy(z, lse));
    if (lse_out.defined()) lse_out.narrow(0, s, c).copy_(lse);
  }
  return o;
}

struct ChunkedHeadFn : public torch::autograd::Function<ChunkedHeadFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& w, const at::Tensor& labels,
                               const at::Tensor& temp, bool with_entropy, int64_t chunk) {
    at::Tensor lse = at::empty({h.size(0)}, h.options().dtype(at::kFloat));
    HeadOutputs o = head_forward(h, w, labels, temp, with_entropy, chunk, lse);
    ctx->save_for_backward({h, w, labels, temp, lse});
    ctx->saved_data["chunk"] = chunk;
    if (!with_entropy) return {o.log_probs};
    return {o.log_probs, o.entropy};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &h = saved[0], &w = saved[1], &labels = saved[2], &temp = saved[3], &lse = saved[4];
    const int64_t chunk = ctx->saved_data["chunk"].toInt(), n = h.size(0);
    const at::Tensor g_lp = grads[0];
    const at::Tensor g_ent = grads.size() > 1 ? grads[1] : at::Tensor();
    at::Tensor dh = at::empty_like(h);
    at::Tensor dw = at::zeros(w.sizes(), w.options().dtype(at::kFloat));
    // Per-row factors with the temperature folded in: ∂/∂(h·Wᵀ) = ∂/∂z / T.
    const at::Tensor gl = g_lp.defined() ? (g_lp / temp).unsqueeze(1) : at::zeros({n, 1}, temp.options());
    const at::Tensor ge = g_ent.defined() ? (g_ent / temp).unsqueeze(1) : at::Tensor();
    for (int64_t s = 0; s < n; s += chunk) {
      const int64_t c = std::min(chunk, n - s);
      at::Tensor z = chunk_logits(h, w, temp, s, c);
      const at::Tensor lse_c = lse.narrow(0, s, c).unsqueeze(1), gl_c = gl.narrow(0, s, c);
      at::Tensor dz;
      if (ge.defined()) {  // p · ((Σp·z − z)·ge − gl)
        at::Tensor p = (z - lse_c).exp_();
        at::Tensor ez = (p * z).sum(1, true);
        dz = z.neg_().add_(ez).mul_(ge.narrow(0, s, c)).sub_(gl_c).mul_(p);
      } else {  // −p · gl, in place over the chunk's logits
        dz = z.sub_(lse_c).exp_().mul_(gl_c.neg());
      }
      dz.scatter_add_(1, labels.narrow(0, s, c).unsqueeze(1), gl_c);
      const at::Tensor g = dz.to(h.scalar_type());
      const at::Tensor hc = h.narrow(0, s, c);
      dh.narrow(0, s, c).copy_(at::mm(g, w));
      if (w.scalar_type() == at::kFloat) dw.addmm_(g.t(), hc);
      else dw.add_(at::mm(g.t(), hc));
    }
    return {dh, dw.to(w.scalar_type()), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor logits_entropy(const at::Tensor& z, const at::Tensor& lse) {
  return lse - (at::softmax(z, -1) * z).sum(-1);
}

HeadOutputs lm_head_log_probs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                              const at::Tensor& temperature, bool with_entropy, int64_t chunk_rows) {
  if (hidden.dim() != 2 || weight.dim() != 2 || hidden.size(1) != weight.size(1))
    fail("lm head: hidden ", hidden.sizes(), " does not match the head weight ", weight.sizes());
  if (labels.numel() != hidden.size(0) || temperature.numel() != hidden.size(0))
    fail("lm head: ", hidden.size(0), " rows but ", labels.numel(), " labels and ", temperature.numel(), " temperatures");
  const int64_t chunk = rows_per_chunk(weight.size(0), chunk_rows);
  const at::Tensor temp = temperature.to(at::kFloat).clamp_min(1e-8);
  const bool grad = at::GradMode::is_enabled() && (hidden.requires_grad() || weight.requires_grad());
  if (!grad) return head_forward(hidden, weight, labels, temp, with_entropy, chunk, at::Tensor());
  variable_list r = ChunkedHeadFn::apply(hidden, weight, labels, temp, with_entropy, chunk);
  HeadOutputs o;
  o.log_probs = r[0];
  if (with_entropy) o.entropy = r[1];
  return o;
}

}  // namespace verl
