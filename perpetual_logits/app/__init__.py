"""The application on top of the library: the named methods (:mod:`.methods`), loading a model and running a method
(:mod:`.running`), the "why models stop" report (:mod:`.report`), the demo (:mod:`.demo`), GGUF chat models
(:mod:`.chat_model`) and the command line (:mod:`.cli`)."""
