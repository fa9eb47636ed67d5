"""lssf evaluation: lm-eval task folders, judges, reports, the release gate, the model organism.

Modules (imported on demand; `lm_eval` and `transformers` load only when needed):
- `evaluation.judges`  - refusal / harm judges behind one interface, with a registry
- `evaluation.suites`  - suite configs and their resolution into lm-eval task configs
- `evaluation.runner`  - `evaluate(model, suite, out, ...) -> EvalReport`
- `evaluation.report`  - `EvalReport`
- `evaluation.gates`   - `GateConfig`, `evaluate_gate(candidate, baseline, config)`
- `evaluation.cli`     - `lssf evaluate` and `lssf gate`
- `evaluation.organism` - the model organism (built by `lssf organism build`)
"""
