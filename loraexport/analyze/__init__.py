"""What ΔW = s·B·A is and does: the LoRA paper's section 7 for the user's own adapter
(``analyze``), and its tables 5 and 6 for the user's own task (``sweep``).

``spectra`` holds the math, ``analysis`` computes ``analysis.json``, ``report`` renders it
(Markdown and plots), ``sweep`` trains and tabulates, ``cli`` holds the click commands.
"""
