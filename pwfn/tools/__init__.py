"""The tools above everything (with :mod:`pwfn.cli`): ``pwfn doctor``, ``pwfn inspect``, pictures
(:mod:`~pwfn.tools.plot`) and the config reference (:mod:`~pwfn.tools.configdoc`)."""
