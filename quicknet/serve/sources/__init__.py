"""Where a front's models come from: `local` (engines in this process) or, with `--workers` > 1,
the engine process over shared memory (`remote`, its `EngineClient`). Both give the
runtime the same `ModelHandle`s and the same repository face (`runtime.ModelSource`)."""
