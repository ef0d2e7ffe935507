"""Decoded text: the ending catalogue (:mod:`.endings`), phrase matching (:mod:`.matcher`, :mod:`.phrase_stream`),
incremental detokenization (:mod:`.text_stream`) and loop detection (:mod:`.repetition`)."""
