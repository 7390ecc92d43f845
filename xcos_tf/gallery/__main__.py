from xcos_tf.gallery import cli

cli.run()
