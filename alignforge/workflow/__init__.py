"""The whole workflow as one resumable pipeline: ``alignforge iterate`` and ``alignforge demo``.

alignforge iterate examples/iterate.yaml      # rounds of sample -> judge -> RM -> PPO -> eval
alignforge demo --quick                       # everything, on the embedded model, in minutes
alignforge examples                           # the example configs and data, into ./examples
"""
