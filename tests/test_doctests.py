"""The examples in the docstrings run, and show what they say. Examples that need what the tests
do not have (a downloaded tokenizer, the 8 MB default corpus, your own text) are marked
`# doctest: +SKIP`; they still read as documentation."""
import doctest

import pytest

import common
import corpus
import data
import infer
import kernels
import merge
import plamo2
import posttrain
import prune
import tasks
import tokenizer
import train


@pytest.mark.parametrize("module", [common, kernels, tokenizer, corpus, plamo2, data, train, infer, prune, tasks, posttrain,
                                    merge], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    # Names some examples take as given: corpus's world, and the tokenizer of Tokenizer's example.
    globs = {"w": corpus.build_world(1337), "tok": tokenizer.Tokenizer({bytes([b]): b for b in range(256)})}
    result = doctest.testmod(module, extraglobs=globs, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {module.__name__} failed"
    assert result.attempted > 0
