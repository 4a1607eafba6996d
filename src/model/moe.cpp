// moe.cpp — the sparse MLP and the load-balancing loss (see moe.h).
#include "model/moe.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>

#include "core/error.h"
#include "hf/config.h"
#include "model/transformer.h"

namespace verl {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Identity on the layer's output; backward adds the load-balancing loss's gradient to the
// router probabilities `p` (see moe.h).
struct AuxLossGrad : public torch::autograd::Function<AuxLossGrad> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& out, const at::Tensor& p, int64_t aux) {
    ctx->saved_data["aux"] = aux;
    ctx->saved_data["n"] = p.size(0);
    ctx->saved_data["dtype"] = static_cast<int64_t>(p.scalar_type());
    return out.view_as(out);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    const auto* a = reinterpret_cast<const MoeAux*>(ctx->saved_data["aux"].toInt());
    const int64_t n = ctx->saved_data["n"].toInt();
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    const double r = static_cast<double>(a->rows);
    const int64_t E = a->counts.size(0);
    const at::Tensor row = (a->counts * (a->grad_scale * double(E) / (r * r))).to(dtype);
    return {g[0], row.unsqueeze(0).expand({n, E}), at::Tensor()};
  }
};

// Rows sorted by expert (sizes[e] rows for each of the layer's experts) through their
// expert's SwiGLU MLP, in the same order; experts without a row are skipped unless
// `every_expert` (expert parallelism: every rank's graph must reach its expert unit and the
// all-to-alls, whose backward are collectives, even when it received no row).
at::Tensor experts_local(const DecoderLayer& l, const at::Tensor& xs, const std::vector<int64_t>& sizes,
                         bool every_expert = false) {
  const int64_t E = static_cast<int64_t>(sizes.size()), H = xs.size(1);
  const at::Tensor gate_up = l.experts_gate_up.view({E, -1, H});  // [E, 2I, H]
  const at::Tensor down = l.experts_down.view({E, H, -1});        // [E, H, I]
  const std::vector<at::Tensor> parts = xs.split_with_sizes(sizes, 0);
  std::vector<at::Tensor> ys;
  for (int64_t e = 0; e < E; ++e) {
    if (sizes[e] == 0 && !every_expert) continue;
    const std::vector<at::Tensor> gu = at::linear(parts[e], gate_up[e]).chunk(2, 1);
    ys.push_back(at::linear(at::silu(gu[0]) * gu[1], down[e]));
  }
  return ys.empty() ? at::empty({0, H}, xs.options()) : at::cat(ys, 0);
}

// The same with the experts spread over the ranks of l.ep (see ExpertParallel): `sizes` counts
// every expert of the model; this rank computes its own experts for the rows of every rank.
at::Tensor experts_parallel(const DecoderLayer& l, const at::Tensor& xs, const std::vector<int64_t>& sizes) {
  const ExpertParallel& ep = *l.ep;
  const int P = ep.size();
  const int64_t E = static_cast<int64_t>(sizes.size()), El = E / P, H = xs.size(1);
  // Rows for rank j: its experts' rows, contiguous in the sorted order.
  std::vector<int64_t> send(P, 0);
  for (int64_t e = 0; e < E; ++e) send[e / El] += sizes[e];
  const int64_t m = std::max<int64_t>(1, ep.max(*std::max_element(send.begin(), send.end())));
  // The per-expert counts first: block j = the counts of rank j's experts.
  const at::Tensor cnt_send = at::tensor(sizes, at::kLong).view({P, El});  // host: read back below
  const at::Tensor cnt_recv = ep.all_to_all(cnt_send).contiguous();  // [P, El]: from rank i, per local expert
  const int64_t* rc = cnt_recv.data_ptr<int64_t>();
  // Rows padded to m per destination.
  std::vector<at::Tensor> blocks;
  const std::vector<at::Tensor> per_rank = xs.split_with_sizes(send, 0);
  for (int j = 0; j < P; ++j) blocks.push_back(at::constant_pad_nd(per_rank[j], {0, 0, 0, m - send[j]}));
  const at::Tensor recv = ep.all_to_all(at::cat(blocks, 0));  // [P·m, H]
  // Received rows grouped by local expert: for each expert, rank 0's rows, then rank 1's, ...
  std::vector<int64_t> idx, esize(El, 0);
  for (int64_t e = 0; e < El; ++e)
    for (int i = 0; i < P; ++i) {
      int64_t start = i * m;
      for (int64_t f = 0; f < e; ++f) start += rc[i * El + f];
      for (int64_t r = 0; r < rc[i * El + e]; ++r) idx.push_back(start + r);
      esize[e] += rc[i * El + e];
    }
  const at::Tensor index = at::tensor(idx, at::kLong).to(recv.device());
  const at::Tensor ys = experts_local(l, recv.index_select(0, index), esize, true);
  // Back into the received layout (zeros in the pad), home, and the pad dropped.
  const at::Tensor back = at::zeros({P * m, H}, ys.options()).index_add(0, index, ys);
  const at::Tensor home = ep.all_to_all(back);
  std::vector<at::Tensor> mine;
  for (int j = 0; j < P; ++j) mine.push_back(home.narrow(0, j * m, send[j]));
  return at::cat(mine, 0);
}

}  // namespace

double MoeAux::value() const {
  if (rows == 0 || !counts.defined()) return 0.0;
  const double r = static_cast<double>(rows);
  return (counts * prob_sum).sum().item<double>() * double(counts.size(0)) / (r * r);
}

at::Tensor moe_mlp(const ModelConfig& c, const DecoderLayer& l, const at::Tensor& x, MoeAux* aux) {
  const int64_t n = x.size(0), H = x.size(1), E = c.num_experts, k = c.num_experts_per_tok;
  // Router: logits in the compute dtype, softmax in fp32, top-k, renormalisation.
  const at::Tensor logits = at::linear(x, l.router);  // [n, E]
  at::Tensor probs = at::softmax(logits, -1, at::kFloat);
  auto [topv, topi] = at::topk(probs, k, -1);  // [n, k]
  if (c.norm_topk_prob) topv = topv / topv.sum(-1, true);
  if (c.family != Family::Mixtral) topv = topv.to(logits.scalar_type());

  // Grouped experts: the n·k (token, choice) pairs sorted by expert (stable: token order kept
  // inside an expert), each expert's matmuls on its contiguous slice.
  const at::Tensor flat_e = topi.reshape({-1});
  const at::Tensor order = at::argsort(flat_e, /*stable=*/true);
  const at::Tensor token = at::floor_divide(order, k);
  const at::Tensor counts_t = at::bincount(flat_e, {}, E).cpu();
  const int64_t* counts = counts_t.data_ptr<int64_t>();
  const at::Tensor xs = x.index_select(0, token);  // [n·k, H]
  const std::vector<int64_t> sizes(counts, counts + E);
  const at::Tensor ys = l.ep ? experts_parallel(l, xs, sizes) : experts_local(l, xs, sizes);
  at::Tensor out = at::zeros({n, H}, x.options());
  if (ys.size(0) > 0) {
    const at::Tensor w = topv.reshape({-1}).index_select(0, order).unsqueeze(1);
    out = out.index_add(0, token, (ys * w).to(x.scalar_type()));
  }
  if (l.shared_gate_up.defined()) {  // Qwen2-MoE: + sigmoid(gate(x)) · shared_expert(x)
    const std::vector<at::Tensor> gu = at::linear(x, l.shared_gate_up).chunk(2, 1);
    const at::Tensor shared = at::linear(at::silu(gu[0]) * gu[1], l.shared_down);
    out = out + at::sigmoid(at::linear(x, l.shared_gate)) * shared;
  }
  if (aux && n > 0) {
    // load_balancing_loss_func: softmax and top-k in the logits' dtype.
    const at::Tensor p = at::softmax(logits, -1);
    if (aux->counting) {
      const at::Tensor sel = std::get<1>(at::topk(p, k, -1)).reshape({-1});
      const at::Tensor cnt = at::bincount(sel, {}, E).to(at::kDouble);
      const at::Tensor ps = p.detach().to(at::kDouble).sum(0);
      aux->counts = aux->counts.defined() ? aux->counts + cnt : cnt;
      aux->prob_sum = aux->prob_sum.defined() ? aux->prob_sum + ps : ps;
      aux->rows += n;
    }
    if (at::GradMode::is_enabled() && aux->grad_scale != 0.0)
      out = AuxLossGrad::apply(out, p, reinterpret_cast<int64_t>(aux));
  }
  return out;
}

}  // namespace verl
