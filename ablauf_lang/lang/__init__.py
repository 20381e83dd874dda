"""The language's front end: source text to the lowered workflow tree.

    reader (Lark) -> forms -> compiler (rules) -> nodes (engine.kinds)
                                 |
                  evaluator (compile time: Env, closures, special forms)
                  loader (the modules `(import ...)` reads: the only file I/O)

`forms` are the reader's data, `printer` inverts the reader, `session` feeds input piece
by piece into one scope (the REPL's door). What is left of an expression for run time is
`ablauf_lang.code` (below the engine); nothing here is imported by the engine.
"""
