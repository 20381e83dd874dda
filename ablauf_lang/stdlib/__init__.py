"""The standard library: pure builtins, standard actions and `.abl` modules."""
