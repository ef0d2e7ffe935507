"""The application on top of the library: the named methods (:mod:`.methods`), loading a model and running a method
(:mod:`.running`), the "why models stop" report (:mod:`.report`), the demo (:mod:`.demo`) and GGUF chat models
(:mod:`.chat_model`). The command line (:mod:`perpetual_logits.cli`) and the HTTP server (:mod:`perpetual_logits.serve`)
stand on it."""
