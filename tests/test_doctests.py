"""The examples in the docstrings run, and show what they say. Examples that need what the tests
do not have (a downloaded tokenizer, the 8 MB default corpus, your own text) are marked
`# doctest: +SKIP`; they still read as documentation."""
import doctest

import pytest

import corpus
import infer
import kernels
import plamo2
import posttrain
import prune
import train


@pytest.mark.parametrize("module", [kernels, plamo2, corpus, train, infer, prune, posttrain], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    # Names some examples take as given: corpus's world, and the tokenizer of Tokenizer's example.
    globs = {"w": corpus.build_world(1337), "tok": plamo2.Tokenizer({bytes([b]): b for b in range(256)})}
    result = doctest.testmod(module, extraglobs=globs, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {module.__name__} failed"
    assert result.attempted > 0
