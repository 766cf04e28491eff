"""being written this session"""


def add_arguments(parser, name):
    pass


def main(args):
    raise NotImplementedError("being written this session")
