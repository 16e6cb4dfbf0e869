"""Data curation before SFT: look at a data set, screen it, and build retrieval-augmented rows.

    polmctl data inspect builtin:instructions                 # counts, lengths (PNG), duplicates
    polmctl data filter rows.jsonl --out kept.jsonl --dedup --near-dedup 0.8 --max-tokens 1024
    polmctl data raft qa.jsonl docs.jsonl --out raft.jsonl --distractors 3 --p-oracle 0.8

  rows     what a row says, per format: its text, its instruction and answer, its token lengths
  dedup    exact duplicates, and near duplicates by MinHash LSH (datasketch)
  scores   instruction-following difficulty (IFD, Li et al. 2024) and reward-model scores
  screen   the filters in order, the kept rows and a report of every drop and why
  summary  the inspect command's statistics and its length histograms (PNG)
  raft     RAFT rows (Zhang et al. 2024): a question with its oracle document among distractors

Every source ``data.source`` accepts works (builtin:<name>, local files, hub datasets).
"""
