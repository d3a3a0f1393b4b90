"""The Keras 3 (TensorFlow backend) adapter.

The recording train step and kernels, explain, the zoo's networks, the diagnosis callback. Importing this package
imports nothing; its modules import TensorFlow and Keras.
"""
