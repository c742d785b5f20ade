"""The base layer every other layer imports: the typed config (`config`, `dataconfig`,
`tuneconfig`; `configfile` reads params.yaml and presets into it), every path (`layout`),
atomic file writes (`files`), errors and the process environment (`env`). One dvc dep
(`src/visionflow/core`) for all of them. Nothing is imported here: each module on its own."""
