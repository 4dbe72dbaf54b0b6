"""What hyper-connections learn, measured on any checkpoint (HC App. F and Fig. 3, mHC Figs. 3 / 7).

  trace.trace(model, tokens)            every connection's per-token mixing, in one uniform form
  diagnostics.connection_matrices(...)  unrolled C^(0) and per-stream C^(i) matrices
  diagnostics.collapse(...)             cosine similarity of adjacent layers' inputs
  diagnostics.gain(...)                 Amax gain of single and composite residual mixing
  diagnostics.coefficient_stats(...)    distributions of alpha / beta (H_pre / H_post / H_res)
  runner.analyze_checkpoint(workdir, defaults=base.get_config())
                                        all of them on validation text (JSON + PNG in
                                        WORKDIR/analysis; defaults from configs/base.py)
  runner.compare({label: results}, dir) overlay plots across checkpoints
  gradients.gradient_norms(...)         per-sub-layer gradient norms of the validation loss
  gradients.checkpoint_gradient_norms   the same at initialisation and every kept checkpoint
  results                               sweep results: tables, loss curves, the markdown report
  depth                                 the depth study: loss, collapse, gradients, gain vs depth

The command line is analyze.py (analyses) and sweep.py (sweeps and reports).
"""
