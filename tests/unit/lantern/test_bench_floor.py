"""The Lantern benchmark's floor: the prefix trie of the prompts' tokens."""

from mer_ray.bench.lantern import trie_size


def test_trie_size_counts_each_distinct_prefix_token_once():
    assert trie_size([[1, 2, 3], [1, 2, 4], [1, 5]]) == 5  # 1, 2, 3, 4, 5
    assert trie_size([[1, 2], [1, 2]]) == 2  # a repeated prompt costs nothing more
    assert trie_size([[7, 1], [1, 7]]) == 4  # no shared first token: nothing shared
    assert trie_size([]) == 0
    seqs = [[1, 2, 3, 4], [1, 2], [1, 2, 3, 9], [5]]
    assert trie_size(seqs) == trie_size(list(reversed(seqs))) == 6  # order does not matter
