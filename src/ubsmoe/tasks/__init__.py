"""Tasks (docs/design.md): ``classification`` (GLUE) and ``instruction`` (causal LM, commonsense QA).

A task owns the head, the loss, the batch format and the evaluation; :mod:`ubsmoe.assembly`
puts a task, its data and a backbone adapter together for the runner.
"""
