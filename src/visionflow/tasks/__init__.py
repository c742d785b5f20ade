"""Task-specific stage code: one package per task besides classification (which lives in the
stage modules themselves). Each stage module keeps a `TASKS` table, task -> `run(params,
layout)`, and hands a project whose `params.task` is in it to that function; a new task is a
package here with one module per stage plus its config section (`visionflow.core.segconfig`).
The task modules of one stage import nothing of another stage's."""
