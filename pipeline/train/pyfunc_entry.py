"""MLflow "model from code" entry point of the restoration pyfunc (see pipeline/train/pyfunc.py).

MLflow executes this file when it loads the model, instead of unpickling a Python object.
"""

from mlflow.models import set_model

from pipeline.train.pyfunc import CuganPyfunc

set_model(CuganPyfunc())
