"""
Plant typical bugs, one at a time, and see which the test suite catches.

  python tests/mutants.py                 # every mutant (about 7 minutes on 2 cores)
  python tests/mutants.py --only=eval     # the mutants whose name contains 'eval'
  python tests/mutants.py --list

Each mutant is a one-line change a tired programmer could make (an off-by-one in a loop index,
a dropped term, a wrong mask, a swapped argument) in a function the README promises something
about, with the test files that guard that function. The repository is copied to a temporary
folder and each mutant runs there, so the working tree is never touched. A mutant the tests do
not catch is a test to write (or a mutant that changes nothing: say so in its note).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, file, the original text, the mutated text, test files that should catch it)
MUTANTS = [
    # model.py: the mechanism and the losses
    ("model-loop-norm-every-loop", "model.py",
     "if k > 1 and self.loop_rmsnorm is not None:\n            h = self.loop_rmsnorm(h)",
     "if self.loop_rmsnorm is not None:\n            h = self.loop_rmsnorm(h)", "test_model.py"),
    ("model-rmsnorm-without-autograd-drops-eps", "model.py",
     "return rms_normed(x, w, rms_inverse(x, eps))",
     "return rms_normed(x, w, rms_inverse(x, 0.0))", "test_model.py"),
    ("model-readout-copy-rounds-to-float32", "model.py",
     "norm = entry.norm(self.config).to(dtype)", "norm = entry.norm(self.config)",
     "test_model.py"),
    ("model-readout-ignores-loop", "model.py",
     "return READOUTS[self.config.readout].decode(self.readout_norm, h, loop, K)",
     "return READOUTS[self.config.readout].decode(self.readout_norm, h, K, K)",
     "test_model.py"),
    ("model-final-only-decodes-configured-K", "model.py",
     "        K = n_loops or self.config.n_loops\n        return READOUTS",
     "        K = self.config.n_loops\n        return READOUTS", "test_model.py"),
    ("model-alpha-readout-exponents-swapped", "model.py",
     "gamma = torch.exp((1 - alpha) * log_s_ref + alpha * log_s)",
     "gamma = torch.exp(alpha * log_s_ref + (1 - alpha) * log_s)", "test_model.py"),
    ("model-alpha-ema-skips-untrained-loops", "model.py",
     "                if self.training and track:",
     "                if False and track:", "test_model.py"),
    ("model-dropout-after-attention-projection", "model.py",
     "        return self.c_proj(y)\n",
     "        return F.dropout(self.c_proj(y), self.dropout, self.training)\n", "test_model.py"),
    ("model-optimizer-decays-matrices-only", "model.py",
     'groups = [{"params": params, "weight_decay": weight_decay}]',
     'groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay}]',
     "test_model.py"),
    ("model-penalty-last-loop-only", "model.py",
     "penalty = torch.stack([h.pow(2).mean() for h in states]).mean()",
     "penalty = states[-1].pow(2).mean()", "test_model.py"),
    ("model-loss-unweighted", "model.py",
     "loss = sum(w * ce for w, ce in zip(weights, ces) if w > 0) / sum(weights)",
     "loss = sum(ce for w, ce in zip(weights, ces) if w > 0) / len(weights)", "test_model.py"),
    ("model-lean-ce-counts-ignored", "model.py",
     "total += (ce * valid[rows]).sum()", "total += ce.sum()", "test_model.py"),
    ("model-lean-ce-gradient-unscaled", "model.py",
     "dx.div_(n)", "dx.div_(1)", "test_model.py"),
    ("model-lean-ce-grad-counts-ignored", "model.py",
     "keep = valid[rows, None].to(dt)", "keep = torch.ones_like(valid[rows, None], dtype=dt)",
     "test_model.py"),
    ("model-lean-ce-softmax-low-precision", "model.py",
     "logp = torch.log_softmax(xc @ w.t(), dim=-1, dtype=acc)",
     "logp = torch.log_softmax(xc @ w.t(), dim=-1)", "test_model.py"),
    ("model-lean-ce-dw-unscaled", "model.py",
     "dw.div_(n)", "dw.div_(1)", "test_model.py"),
    ("model-rmsnorm-radial-term-unscaled", "model.py",
     "dx.addcmul_(x, dot * r.pow(3), value=-1 / C)", "dx.addcmul_(x, dot * r.pow(3), value=-1)",
     "test_model.py"),
    ("model-rmsnorm-gain-grad-unnormalised", "model.py",
     "dw = gx.reshape(-1, C).t() @ r.reshape(-1)", "dw = gx.reshape(-1, C).sum(0)",
     "test_model.py"),
    ("model-rmsnorm-eps-default-wrong", "model.py",
     "eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps",
     "eps = 1e-6 if self.eps is None else self.eps", "test_model.py"),
    ("model-rmsnorm-backward-matmuls-autocast", "model.py",
     'with torch.autocast("cpu", enabled=False):', "if True:", "test_model.py"),
    ("model-rmsnorm-no-second-derivative", "model.py",
     "if torch.is_grad_enabled():", "if False:", "test_model.py"),
    ("model-entropy-sign", "model.py",
     "return -(logp.exp() * logp).sum(dim=-1)",
     "return (logp.exp() * logp).sum(dim=-1)", "test_model.py"),
    ("model-residual-init-depth", "model.py",
     "residual_std = 0.02 / math.sqrt(2 * cfg.n_layer * cfg.n_loops)",
     "residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)", "test_model.py"),
    # rundir.py: the batches and the log
    ("rundir-targets-not-shifted", "rundir.py",
     "return xy[:, :-1], xy[:, 1:]", "return xy[:, :-1], xy[:, :-1]", "test_train.py"),
    ("rundir-eval-seed-ignores-split", "rundir.py",
     "return 10**9 + 7919 * i + (split == \"val\")", "return 10**9 + 7919 * i",
     "test_train.py test_eval.py"),
    ("rundir-epoch-order-same-every-epoch", "rundir.py",
     "manual_seed((seed * 1_000_003 + epoch) % (1 << 63))",
     "manual_seed((seed * 1_000_003) % (1 << 63))", "test_data.py"),
    ("rundir-resume-log-duplicates", "rundir.py",
     "if ckpt[\"iter_num\"] not in logged and \"log_entry\" in ckpt:",
     "if \"log_entry\" in ckpt:", "test_faults.py test_train.py"),
    # train.py: the schedule, the batches, DDP
    ("train-warmup-off-by-one", "train.py",
     "return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)",
     "return cfg.learning_rate * it / (cfg.warmup_iters + 1)", "test_train.py"),
    ("train-cosine-wrong-phase", "train.py",
     "return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - "
     "cfg.min_lr)",
     "return cfg.min_lr + 0.5 * (1 - math.cos(math.pi * progress)) * (cfg.learning_rate - "
     "cfg.min_lr)", "test_train.py"),
    ("train-micro-batches-repeat", "train.py",
     "return batch(\"train\", train_seed(cfg.seed, iter_num, micro))",
     "return batch(\"train\", train_seed(cfg.seed, iter_num, 0))", "test_train.py test_device.py"),
    ("train-epoch-micro-batches-overlap", "train.py",
     "return (iter_num * accumulation + micro) * batch_size",
     "return (iter_num + micro) * batch_size", "test_data.py"),
    ("train-epochs-steps-rounded-down", "train.py",
     "return -(-math.ceil(epochs * count) // global_batch)",
     "return math.ceil(epochs * count) // global_batch", "test_data.py"),
    ("train-ddp-share-overlaps", "train.py",
     "return [(m * world + rank, slice(None)) for m in range(accumulation // world)], None",
     "return [(m + rank, slice(None)) for m in range(accumulation // world)], None",
     "test_device.py"),
    ("train-skip-on-local-loss", "train.py",
     "step_ok = bool(torch.isfinite(norm))", "step_ok = bool(torch.isfinite(loss))",
     "test_device.py test_reliability.py"),
    ("train-resume-forgets-rng", "train.py",
     "set_rng_state(rngs[rank], cfg.device)", "pass", "test_train.py"),
    # prepare.py: the paper's word vocabulary
    ("prepare-word-ties-first-seen", "prepare.py",
     "words.sort(key=lambda w: (-counts[w], w))", "words.sort(key=lambda w: -counts[w])",
     "test_data.py"),
    ("prepare-word-vocab-train-only", "prepare.py",
     "words = word_vocabulary(train + val)", "words = word_vocabulary(train)", "test_data.py"),
    # eval.py: halting, the depth map, the diagnostics
    ("eval-exit-loop-off-by-one", "eval.py",
     "exit_at = passed.float().argmax(dim=0) + 1  # first True",
     "exit_at = passed.float().argmax(dim=0)  # first True", "test_eval.py"),
    ("eval-held-out-overlaps", "eval.py",
     "held = [get_batch(data[half:], batch_size, block_size, eval_seed(i, \"held\"), device)",
     "held = [get_batch(data[half // 2:], batch_size, block_size, eval_seed(i, \"held\"), device)",
     "test_eval.py"),
    ("eval-calibrate-stops-at-first-miss", "eval.py",
     "        if ppl <= target * full and loops < best[1]:\n            best = (t, loops, ppl)",
     "        if ppl > target * full:\n            break\n        best = (t, loops, ppl)",
     "test_eval.py"),
    ("eval-grid-drops-its-ends", "eval.py",
     "grid = [s.min() - 1e-6, *np.unique(np.quantile(s, np.linspace(0, 1, n))), s.max() + 1e-6]",
     "grid = [*np.unique(np.quantile(s, np.linspace(0, 1, n)))]", "test_eval.py"),
    ("eval-paper-halting-per-token", "eval.py",
     'halting(same, same, p, K, cfg.target, n, "sequence")',
     'halting(same, same, p, K, cfg.target, n, "token")', "test_eval.py"),
    ("eval-lemma2-turn-times-next-rms", "eval.py",
     "b_k.append((du * s0[..., 0]).mean())", "b_k.append((du * s[..., 0]).mean())",
     "test_eval.py"),
    ("eval-remove-radial-half", "eval.py",
     "h = (wide(h) - along * p).to(h.dtype)", "h = (wide(h) - 0.5 * along * p).to(h.dtype)",
     "test_eval.py"),
    ("eval-variable-depth-as-early-exit", "eval.py",
     "ce_b.append(readout_ce(model, h, k, y, dtype, n_loops=k))",
     "ce_b.append(readout_ce(model, h, k, y, dtype))", "test_eval.py"),
    ("eval-ce-gap-reversed", "eval.py",
     'out["endpoint"] = {"ce_gap": ce[0] - ce[K - 1],',
     'out["endpoint"] = {"ce_gap": ce[K - 1] - ce[0],', "test_eval.py"),
    ("eval-radial-fraction-always-last-loop", "eval.py",
     "h, y = hs[loop - 1].cpu().double().flatten(0, 1), y.cpu().flatten()",
     "h, y = hs[-1].cpu().double().flatten(0, 1), y.cpu().flatten()", "test_eval.py"),
    ("eval-frontier-counts-sequences", "eval.py",
     '"tokens_per_s": [x.numel() / statistics.median(ts)',
     '"tokens_per_s": [x.size(0) / statistics.median(ts)', "test_eval.py"),
    ("experiments-spearman-ties-first-rank", "experiments.py",
     "ranks[t] = (i + j) / 2 + 1", "ranks[t] = i + 1", "test_plots.py"),
    ("experiments-claim2-judges-terminal-runs", "experiments.py",
     'fix = fix and r["config"]["supervision"] == "per_loop" and not r["config"]["loop_norm"]',
     'fix = fix and not r["config"]["loop_norm"]', "test_plots.py"),
    ("eval-spread-wrong-quantile", "eval.py",
     "q = torch.tensor([0.5, 0.9, 0.99, 1.0], dtype=torch.float64)",
     "q = torch.tensor([0.5, 0.95, 0.99, 1.0], dtype=torch.float64)", "test_eval.py"),
    # sample.py: the KV cache and adaptive exit (and model.py's decode path)
    ("sample-cached-step-forgets-position", "sample.py",
     "x, pos0 = out[:, t - 1:t], n_cached", "x, pos0 = out[:, t - 1:t], 0", "test_sample.py"),
    ("sample-refill-off-by-one", "sample.py",
     "n_cached = pos0 + x.size(1)", "n_cached = pos0 + x.size(1) - 1", "test_sample.py"),
    ("sample-exit-rule-skips-a-loop", "sample.py",
     "for k in range(e + 1, K + 1):\n            # loop k - 1",
     "for k in range(e + 2, K + 1):\n            # loop k - 1", "test_sample.py"),
    ("sample-exit-rule-one-loop-for-all", "sample.py",
     "if e == max(used):", "if True:", "test_sample.py"),
    ("sample-dense-exit-rule-from-loop-3", "sample.py",
     "if caches is not None and k > 1 and some:", "if caches is not None and k > 2 and some:",
     "test_sample.py"),
    ("sample-ragged-writes-the-first-rows", "sample.py",
     "self.kv.index_put_((c.rows, c.pos), new[:, 0, 1:])",
     "self.kv[:len(c.rows)].index_copy_(1, c.pos, new[:, :, 1:])", "test_sample.py"),
    ("sample-compiled-mask-hides-the-new-token", "sample.py",
     "c.positions <= c.pos[:, None]", "c.positions < c.pos[:, None]", "test_sample.py"),
    ("model-decode-norm-eps-not-times-c", "model.py",
     "math.sqrt(C * norm_eps(norm, a.c_proj.weight.dtype))",
     "math.sqrt(norm_eps(norm, a.c_proj.weight.dtype))", "test_sample.py"),
    # eval.py --run=speed, experiments.py over seeds, reproduce.sh
    ("eval-speed-mean-not-median", "sample.py",
     "tokens / statistics.median(times[name])", "tokens / statistics.mean(times[name])",
     "test_eval.py"),
    ("eval-speed-share-of-ideal-inverted", "sample.py",
     "shares = [a / b / (K / m)", "shares = [b / a / (K / m)", "test_eval.py"),
    ("eval-speed-times-the-warm-up", "eval.py",
     "            if r:\n                times[kind]",
     "            if True:\n                times[kind]", "test_eval.py"),
    ("experiments-held-in-any-seed", "experiments.py",
     "\"held\": n_held == len(seeds) and bool(seeds)", "\"held\": n_held > 0",
     "test_plots.py"),
    ("experiments-spread-population-std", "experiments.py",
     "\"std\": t.std().item() if", "\"std\": t.std(correction=0).item() if", "test_plots.py"),
    ("reproduce-every-seed-the-same", "reproduce.sh",
     "--seed=\"$seed\" $flags", "--seed=1 $flags", "test_plots.py"),
    # train.py and rundir.py: stopping on a signal, --init_from=auto, torchrun restarts
    ("train-stop-unevaluated-counts-as-logged", "train.py",
     'logged_at = ckpt["iter_num"] if ckpt and "log_entry" in ckpt else None',
     'logged_at = ckpt["iter_num"] if ckpt else None',
     "test_preempt.py::test_torchrun_stops_together_and_restarts_a_group_that_lost_a_process"),
    ("train-stop-on-own-signal-not-agreed", "train.py",
     "            stop_signal = stop.agreed()", "            stop_signal = stop.signum",
     "test_preempt.py::test_torchrun_stops_together_and_restarts_a_group_that_lost_a_process"),
    ("train-stop-every-rank-writes", "train.py",
     "if master:  # one checkpoint, by one process", "if True:  # one checkpoint, by one process",
     "test_preempt.py::test_torchrun_stops_together_and_restarts_a_group_that_lost_a_process"),
    ("train-stop-write-not-shielded", "train.py",
     "and not self.ddp and not self.writing:", "and not self.ddp:",
     "test_preempt.py::test_signals_at_random_moments_and_during_the_checkpoint_write"),
    ("rundir-auto-scratch-over-a-log", "rundir.py",
     "    if not entries:\n        return \"scratch\", None",
     "    if True:\n        return \"scratch\", None", "test_preempt.py"),
    # value mutants (#33): a number right in shape and wrong in value; each survived the suite
    # before tests/test_values.py, which catches it (its test named first)
    ('eval-held-out-ratio-against-calibration', 'eval.py',
     '    full = math.exp(held[0][K - 1].double().mean().item())\n    if t is None:',
     '    full = math.exp(cal[0][K - 1].double().mean().item())\n    if t is None:',
     'test_values.py::test_eval_json_per_depth_and_halting_recomputed test_eval.py'),
    ('eval-held-out-sequence-halting-per-token', 'eval.py',
     'halting(cal, held, p, K, cfg.target, n, unit)', 'halting(cal, held, p, K, cfg.target, n)',
     'test_values.py::test_eval_json_per_depth_and_halting_recomputed test_eval.py'),
    ('eval-full-depth-is-the-deepest', 'eval.py',
     '"full_depth_ppl": math.exp(mean_ce[K - 1])', '"full_depth_ppl": math.exp(mean_ce[-1])',
     'test_values.py::test_eval_json_per_depth_and_halting_recomputed test_eval.py'),
    ('eval-sweep-thresholds-from-held-out', 'eval.py',
     'ts = threshold_grid(cal[1][p], p, K, n, unit)',
     'ts = threshold_grid(held[1][p], p, K, n, unit)',
     'test_values.py::test_eval_json_per_depth_and_halting_recomputed test_eval.py'),
    ('eval-n-tokens-counts-every-depth', 'eval.py',
     '"n_tokens": ce[0].numel()', '"n_tokens": ce.numel()',
     'test_values.py::test_eval_json_per_depth_and_halting_recomputed test_eval.py'),
    ('eval-spread-std-is-variance', 'eval.py',
     '"std": last.std().item()', '"std": last.var().item()',
     'test_values.py::test_spread_and_lemma1_summaries_recomputed test_eval.py'),
    ('eval-frontier-clock-before-sync', 'eval.py',
     '                model.readout(h, k)\n            synchronize(device)\n',
     '                model.readout(h, k)\n',
     'test_values.py::test_eval_speed_and_frontier_read_the_clock_after_a_synchronize '
     'test_eval.py'),
    ('train-hidden-norm-of-train-split', 'train.py',
     'for split in ("train", "val"):', 'for split in ("val", "train"):',
     'test_values.py::test_log_values_recomputed_token_by_token test_train.py'),
    ('train-throughput-ignores-accumulation', 'train.py',
     'tokens_per_iter = cfg.batch_size * cfg.gradient_accumulation_steps * cfg.block_size',
     'tokens_per_iter = cfg.batch_size * cfg.block_size',
     'test_values.py::test_log_values_recomputed_token_by_token test_train.py'),
    ('train-elapsed-since-last-evaluation', 'train.py',
     'elapsed = elapsed0 + time.time() - t_start', 'elapsed = elapsed0 + time.time() - t_last',
     'test_values.py::test_log_values_recomputed_token_by_token test_train.py'),
    ('train-clips-each-value', 'train.py',
     'torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)',
     'torch.nn.utils.clip_grad_value_(params, cfg.grad_clip)',
     'test_values.py::test_training_step_equals_a_plain_reference_step test_train.py'),
    ('train-clips-the-scaled-gradient', 'train.py',
     "scaler.unscale_(optimizer)  # a no-op without float16's scaler",
     "pass  # a no-op without float16's scaler",
     'test_values.py::test_training_step_equals_a_plain_reference_step test_train.py'),
    ('train-weight-decay-on-ignored', 'train.py',
     '(cfg.beta1, cfg.beta2), dev, cfg.weight_decay_on)', '(cfg.beta1, cfg.beta2), dev)',
     'test_values.py::test_training_step_equals_a_plain_reference_step test_train.py'),
    ('train-beta2-fixed-at-the-default', 'train.py',
     '(cfg.beta1, cfg.beta2), dev', '(cfg.beta1, 0.999), dev',
     'test_values.py::test_training_step_equals_a_plain_reference_step test_train.py'),
    ('model-flops-attention-one-loop', 'model.py',
     'attention = 12 * cfg.n_layer * cfg.n_loops * cfg.n_embd * cfg.block_size',
     'attention = 12 * cfg.n_layer * cfg.n_embd * cfg.block_size',
     'test_values.py::test_flops_per_token_equals_the_matmuls_a_step_runs test_bench.py'),
    ('sample-top-k-returns-its-rank', 'sample.py',
     'return ix.gather(-1, draw(F.softmax(v, dim=-1)))',
     'return draw(F.softmax(v, dim=-1))',
     'test_values.py::test_sample_next_draws_from_the_tempered_top_k_distribution '
     'test_sample.py'),
    ('sample-top-k-keeps-one-fewer', 'sample.py',
     'v, ix = torch.topk(logits, top_k)',
     'v, ix = torch.topk(logits, top_k - 1)',
     'test_values.py::test_sample_next_draws_from_the_tempered_top_k_distribution '
     'test_sample.py'),
    ('sample-draw-multiplies-by-the-exponential', 'sample.py',
     'return probs.div_(e).argmax(dim=-1, keepdim=True)',
     'return probs.mul_(e).argmax(dim=-1, keepdim=True)',
     'test_values.py::test_draw_picks_each_entry_with_its_probability'),
    ('sample-draw-divides-by-an-exact-zero', 'sample.py',
     'e = torch.empty_like(probs).exponential_().clamp_min_(torch.finfo(probs.dtype).tiny)',
     'e = torch.empty_like(probs).exponential_()',
     'test_values.py::test_draw_picks_each_entry_with_its_probability'),
    ('sample-ragged-tests-every-loop', 'sample.py',
     '        if k < K and k not in tested:', '        if k < K and k not in range(1, K):',
     'test_sample.py::test_exit_tests_at_some_loops_only_match_recompute'),
    ('sample-dense-tests-every-loop', 'sample.py',
     '        test = k in tested\n', '        test = k < K\n',
     'test_sample.py::test_exit_tests_at_some_loops_only_match_recompute'),
    ('eval-schedule-counts-no-test-at-the-exit-loop', 'eval.py',
     'tests = sum((last >= k).double() for k in tested)',
     'tests = sum((last > k).double() for k in tested)',
     'test_values.py::test_exit_schedule_keeps_the_tests_that_pay_and_meets_the_target'),
    ('eval-schedule-ignores-the-target', 'eval.py',
     'options = [(c, k) for (c, ppl), k in options if ppl <= target * full]',
     'options = [(c, k) for (c, ppl), k in options]',
     'test_values.py::test_exit_schedule_keeps_the_tests_that_pay_and_meets_the_target'),
    ('eval-test-cost-over-the-full-time', 'eval.py',
     'ratios = [(tests - full) / max(full - one, 1e-12)',
     'ratios = [(tests - full) / max(full, 1e-12)',
     'test_values.py::test_exit_test_cost_is_the_tests_time_over_the_loops_time'),
    ('eval-speed-ppl-of-every-test', 'eval.py',
     '                                tested)[1]', '                                )[1]',
     'test_values.py::test_speed_times_the_schedule_and_reports_its_held_out_ppl'),
    ('eval-schedule-batch-waits-for-its-first-row', 'eval.py',
     'reshape(-1, batch).amax(dim=1)', 'reshape(-1, batch).amin(dim=1)',
     'test_values.py::test_exit_schedule_keeps_the_tests_that_pay_and_meets_the_target'),
    ('eval-speed-test-cost-at-batch-1-only', 'eval.py',
     'cost = exit_test_cost(model, prompts,', 'cost = exit_test_cost(model, prompts[:1],',
     'test_values.py::test_speed_times_the_schedule_and_reports_its_held_out_ppl'),
    ('sample-mean-loops-of-the-last-sample', 'sample.py',
     'mean = torch.cat(used, dim=1).mean().item()', 'mean = used[-1].mean().item()',
     'test_values.py::test_sample_cli_mean_loops_over_every_generated_token test_sample.py'),
    ('experiments-run-ppl-every-depth', 'experiments.py',
     '"ppl": ev["per_depth"]["ppl"][:ev["n_loops"]] if ev else None',
     '"ppl": ev["per_depth"]["ppl"] if ev else None',
     'test_values.py::test_claims_json_recomputed_from_the_run_folders test_plots.py'),
    ('experiments-table1-ppl-at-loop-1', 'experiments.py',
     'ppls.append(math.exp(last["val_loop_ce"][-1]))',
     'ppls.append(math.exp(last["val_loop_ce"][0]))',
     'test_values.py::test_table1_rows_recomputed_from_the_runs_logs test_plots.py'),
    ('plot-training-norm-of-loop-1', 'plot_norms.py',
     '[e["hidden_norm"][-1] for e in log], label=label[folder])[0]',
     '[e["hidden_norm"][0] for e in log], label=label[folder])[0]',
     'test_values.py::test_plotted_data_and_table_recomputed_from_the_files test_plots.py'),
    ('plot-table-mean-loops-per-token-always', 'plot_norms.py',
     'loops = ev["halting"][unit][policy]["mean_loops"]',
     'loops = ev["halting"]["token"][policy]["mean_loops"]',
     'test_values.py::test_plotted_data_and_table_recomputed_from_the_files test_plots.py'),
    ('device-synchronize-bare-cuda-only', 'device.py',
     '    if kind == "cuda":\n        torch.cuda.synchronize(device)',
     '    if device == "cuda":\n        torch.cuda.synchronize(device)',
     'test_values.py::test_synchronize_waits_for_every_name_of_a_gpu '
     'test_device.py test_bench.py'),
    ('bench-dense-official-ratio-inverted', 'bench.py',
     'ratio("dense step time / official step time", d["step_s"] / official["step_s"],',
     'ratio("dense step time / official step time", official["step_s"] / d["step_s"],',
     'test_values.py::test_bench_report_arithmetic_by_hand test_bench.py'),
    ('bench-cpu-peak-counts-multiplies-only', 'bench.py',
     'return 2 * n ** 3 / best', 'return n ** 3 / best',
     'test_values.py::test_bench_cpu_peak_and_step_figures_from_a_known_clock test_bench.py'),
    # value mutants, second round (#33): ten bugs planted afresh by a reviewer outside the
    # repository, all ten surviving the suite; each is caught by the test named first
    ('train-banner-epoch-steps-by-batch-size', 'train.py',
     '({count / global_batch:,.1f} steps of',
     '({count / cfg.batch_size:,.1f} steps of',
     'test_values.py::test_banner_steps_an_epoch_are_windows_over_the_global_batch'),
    ('train-progress-bar-shows-loop-1', 'train.py',
     'h_K=f"{norms[-1]:.3g}"',
     'h_K=f"{norms[0]:.3g}"',
     'test_values.py::test_progress_bar_shows_the_last_loops_norm_of_the_step'),
    ('eval-spread-histogram-a-bin-short', 'eval.py',
     'torch.logspace(lo, hi, bins + 1, dtype=torch.float64)',
     'torch.logspace(lo, hi, bins, dtype=torch.float64)',
     'test_values.py::test_spread_histogram_bins_every_token_into_log_spaced_bins'),
    ('eval-depth-map-no-threshold-loop-K-1', 'eval.py',
     'loops = torch.full((n_seq, T), K)',
     'loops = torch.full((n_seq, T), K - 1)',
     'test_values.py::test_depth_map_without_a_threshold_runs_every_token_to_loop_K'),
    ('experiments-endpoint-ppl-1-at-depth-2', 'experiments.py',
     '"ppl_1": spread([r["ppl"][0] for r in rs])',
     '"ppl_1": spread([r["ppl"][1] for r in rs])',
     'test_values.py::test_endpoint_table_rows_are_each_runs_first_and_last_exit'),
    ('experiments-claim4-last-over-first', 'experiments.py',
     'values[3] = {r["run"]: max(r["hidden_norm"]) / min(r["hidden_norm"])',
     'values[3] = {r["run"]: r["hidden_norm"][-1] / r["hidden_norm"][0]',
     'test_values.py::test_claim_4_is_the_largest_norm_over_the_smallest'),
    ('plots-trained-depth-marked-one-deeper', 'plot_norms.py',
     'markevery=[K - 1])',
     'markevery=[K])',
     'test_values.py::test_per_depth_panel_marks_the_trained_depth_K'),
    ('plots-depth-map-shade-off-by-one', 'plot_norms.py',
     'return cmap(0.1 + 0.85 * (k - 1) / max(1, K - 1))',
     'return cmap(0.1 + 0.85 * k / max(1, K - 1))',
     'test_values.py::test_depth_map_shades_loop_1_lightest_and_loop_K_darkest'),
    ('sample-speed-up-ratio-of-medians', 'sample.py',
     'return statistics.median(a / b for a, b in zip(times[ref], times[name]))',
     'return statistics.median(times[ref]) / statistics.median(times[name])',
     'test_values.py::test_speed_up_is_the_median_of_the_rounds_paired_ratios'),
    ('bench-ragged-speed-inverted', 'bench.py',
     '"ragged_speed": paired(times, "dense", "ragged")',
     '"ragged_speed": paired(times, "ragged", "dense")',
     'test_values.py::test_bench_ragged_speed_is_dense_time_over_ragged_time'),
    # value mutants, third round (#33): eight more planted afresh by a reviewer, six of them
    # (printed figures) surviving the suite then; each caught by the test named first
    ('train-nonfinite-loop-zero-based', 'train.py',
     'bad = next((k for k, n in enumerate(hidden_norm, 1) if not math.isfinite(n)), None)',
     'bad = next((k for k, n in enumerate(hidden_norm) if not math.isfinite(n)), None)',
     'test_values.py::test_nonfinite_message_names_the_first_loop_that_overflowed '
     'test_reliability.py'),
    ('train-console-prints-train-ce', 'train.py',
     'ces = " ".join(f"{c:.3f}" for c in ev["val_loop_ce"])',
     'ces = " ".join(f"{c:.3f}" for c in ev["train_loop_ce"])',
     'test_values.py::test_evaluation_line_prints_the_logged_val_ce_and_norms test_train.py'),
    ('eval-speed-threshold-per-sequence', 'eval.py',
     'out["speed"] = speed(model, held_data, out["halting"]["token"][cfg.policy], cfg, dtype)',
     'out["speed"] = speed(model, held_data, out["halting"]["sequence"][cfg.policy], cfg, dtype)',
     'test_eval.py'),
    ('eval-print-speed-ppl-swapped', 'eval.py',
     'PPL {s[\'ppl\'][\'full\']:.3f} -> "\n          f"{s[\'ppl\'][\'exit\']:.3f}")',
     'PPL {s[\'ppl\'][\'exit\']:.3f} -> "\n          f"{s[\'ppl\'][\'full\']:.3f}")',
     'test_values.py::test_print_speed_shows_full_then_exit test_eval.py'),
    ('experiments-spearman-ys-unranked', 'experiments.py',
     '"spearman": pearson(rank(xs), rank(ys))',
     '"spearman": pearson(rank(xs), ys)',
     'test_plots.py'),
    ('plots-depth-legend-from-loop-0', 'plot_norms.py',
     'fig.legend(handles, [f"exit at loop {k}" for k in range(1, K + 1)]',
     'fig.legend(handles, [f"exit at loop {k}" for k in range(K)]',
     'test_values.py::test_depth_map_legend_names_loops_1_to_K_in_their_shades test_plots.py'),
    ('sample-share-of-ideal-by-mean-loops', 'sample.py',
     'shares = [a / b / (K / m) for a, b, m in zip(times[ref], times[name], loops[name])]',
     'shares = [a / b / (K / mean_loops) for a, b, m in zip(times[ref], times[name], loops[name])]',
     'test_values.py::test_speed_up_is_the_median_of_the_rounds_paired_ratios test_bench.py'),
    ('bench-report-gflops-by-1e6', 'bench.py',
     "{r['model_flops_per_sec'] / 1e9:>14.2f}",
     "{r['model_flops_per_sec'] / 1e6:>14.2f}",
     'test_values.py::test_bench_report_prints_the_figures_it_returns test_bench.py'),
    # value mutants, fourth round (#33): six more planted afresh by a reviewer; the three the
    # suite missed (printed tables), each caught by the test named first
    ('experiments-printed-radial-1-is-K', 'experiments.py',
     "{r['ce_gap']['mean']:>8.3f} {r['radial_fraction_1']['mean']:>9.2g} ",
     "{r['ce_gap']['mean']:>8.3f} {r['radial_fraction_K']['mean']:>9.2g} ",
     'test_values.py::test_printed_endpoint_table_is_the_rows_it_returns'),
    ('plots-printed-ppl-at-loop-1', 'plot_norms.py',
     "{last['hidden_norm'][-1]:9.4g} {ppl_k[-1]:7.3f}  ",
     "{last['hidden_norm'][-1]:9.4g} {ppl_k[0]:7.3f}  ",
     'test_values.py::test_printed_plot_table_is_the_rows_it_returns'),
    ('prepare-printed-val-is-train', 'prepare.py',
     "val {meta['val_tokens']:,} ",
     "val {meta['train_tokens']:,} ",
     'test_values.py::test_prepare_prints_the_token_counts_it_wrote'),
]


def copy_repo(dest):
    """The tracked and untracked (not ignored) files of the repository, and the data folder."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        os.makedirs(os.path.dirname(os.path.join(dest, f)) or dest, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))


def run_mutant(mutant, work, timeout):
    name, path, old, new, tests = mutant
    file = os.path.join(work, path)
    original = open(file).read()
    if original.count(old) != 1:
        return "stale"  # the code moved on: update the mutant
    open(file, "w").write(original.replace(old, new))
    try:
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
               *[os.path.join("tests", t) for t in tests.split()]]
        p = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=timeout)
        return "caught" if p.returncode != 0 else "SURVIVED"
    except subprocess.TimeoutExpired:
        return "caught (timeout)"
    finally:
        open(file, "w").write(original)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="run the mutants whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the mutants and stop")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per mutant")
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if args.only in m[0]]
    if args.list:
        for m in chosen:
            print(f"{m[0]:<36} {m[1]:<12} tests: {m[4]}")
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as work:
        copy_repo(work)
        for m in chosen:
            start = time.time()
            results[m[0]] = run_mutant(m, work, args.timeout)
            print(f"{m[0]:<36} {results[m[0]]:<18} {time.time() - start:5.0f} s", flush=True)
    survived = [n for n, r in results.items() if r in ("SURVIVED", "stale")]
    print(f"{len(results) - len(survived)} of {len(results)} mutants caught"
          + (f"; not caught: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
