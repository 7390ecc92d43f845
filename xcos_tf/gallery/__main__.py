from xcos_tf.gallery import cli

__doc__ = cli.__doc__  # what --help prints first

cli.run()
