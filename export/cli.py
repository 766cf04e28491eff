"""`sokhan generate` and `sokhan predict`: torch-free, from an exported bundle."""


def add_arguments(parser, name):
    parser.add_argument("--bundle", required=True)


def main(args):
    raise NotImplementedError("being written this session")
