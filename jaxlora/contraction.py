"""The adapter product of a linear layer whose kernel may have several axes.

A linear layer computes `einsum("<inputs>,<kernel>-><outputs>", x, kernel)`
with one label per axis. Each kernel axis has one role:

    batch  also in the inputs and the outputs: one matrix per index, for
           example per head;
    in     contracted with the inputs;
    out    carried to the outputs.

The kernel's axes must come in the order `[*batch, *in, *out]`, which is how
`nn.Dense` (`[in, out]`), `nn.DenseGeneral` (`[*batch_dims, *axis, *features]`)
and most `nn.Einsum` kernels are laid out. Its adapter is

    a: [*batch, *in, r]    b: [*batch, r, *out]    scale: [*batch]

so a plain `[in, out]` kernel gets `a: [in, r]`, `b: [r, out]`, `scale: []`.
The adapter's output is `einsum(x, a)` followed by `einsum(., scale * b)`: the
product `a @ b` in the kernel's shape is never formed.
"""

import dataclasses
import string
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

ELLIPSIS = "..."


@dataclasses.dataclass(frozen=True)
class Contraction:
  """The einsum of a linear layer, with one label per axis of each operand.

  Attributes:
    inputs: labels of the input's axes, for example "btd".
    kernel: labels of the kernel's axes, for example "dhk".
    outputs: labels of the output's axes, for example "bthk".
  """

  inputs: str
  kernel: str
  outputs: str

  def __post_init__(self):
    for operand in (self.inputs, self.kernel, self.outputs):
      if len(set(operand)) != len(operand):
        raise ValueError(
            f"LoRA cannot adapt the layer computing {self}: label repeated in"
            f" {operand!r}. Leave this layer out of the LoRA targets."
        )
    for label in self.kernel:
      if label not in self.inputs and label not in self.outputs:
        raise ValueError(
            f"LoRA cannot adapt the layer computing {self}: kernel axis"
            f" {label!r} is summed out. Leave this layer out of the LoRA"
            " targets."
        )
    batch, fan_in, fan_out = self.roles
    if not fan_in or not fan_out:
      raise ValueError(
          f"LoRA cannot adapt the layer computing {self}: its kernel needs at"
          " least one axis contracted with the inputs and one carried to the"
          " outputs. Leave this layer out of the LoRA targets."
      )
    if self.kernel != batch + fan_in + fan_out:
      raise ValueError(
          f"LoRA cannot adapt the layer computing {self}: its kernel axes are"
          f" ordered {self.kernel!r}, but adapters need the order batch"
          f" {batch!r}, contracted {fan_in!r}, output {fan_out!r}. Reorder the"
          " kernel, leave this layer out of the LoRA targets, or run the"
          " model with jaxlora.wrap_merged."
      )

  def __str__(self):
    return f"{self.inputs},{self.kernel}->{self.outputs}"

  @property
  def roles(self) -> tuple[str, str, str]:
    """The kernel's labels split into (batch, in, out), each in kernel order."""
    batch = "".join(l for l in self.kernel if l in self.inputs and l in self.outputs)
    fan_in = "".join(l for l in self.kernel if l in self.inputs and l not in self.outputs)
    fan_out = "".join(l for l in self.kernel if l in self.outputs and l not in self.inputs)
    return batch, fan_in, fan_out

  @property
  def kernel_axes(self) -> tuple[int, int]:
    """The number of input axes and output axes at the end of the kernel."""
    _, fan_in, fan_out = self.roles
    return len(fan_in), len(fan_out)

  def check_adapter(
      self,
      kernel_shape: Sequence[int],
      lora: Mapping[str, jax.Array],
      module: str,
  ) -> None:
    """Check that adapter shapes fit a kernel of `kernel_shape` under this layout.

    Raises:
      ValueError: naming `module`, the shapes found, the shapes expected and
        the fix, if they differ.
    """
    batch, fan_in, _ = self.roles
    kernel_shape = tuple(kernel_shape)
    n_batch, n_in = len(batch), len(fan_in)
    rank = jnp.shape(lora["a"])[-1]
    expected = {
        "a": kernel_shape[: n_batch + n_in] + (rank,),
        "b": kernel_shape[:n_batch] + (rank,) + kernel_shape[n_batch + n_in :],
        "scale": kernel_shape[:n_batch],
    }
    found = {key: tuple(jnp.shape(lora[key])) for key in expected}
    if found != expected:
      raise ValueError(
          f"The adapter of {module} does not fit its kernel {kernel_shape},"
          f" which the layer contracts as {self} ({len(fan_in)} input axes):"
          f" found shapes {found}, expected {expected}. Build the adapters"
          " with jaxlora.apply(..., kernel_axes=jaxlora.linen_kernel_axes(model,"
          " *inputs)) for a Linen model, or kernel_axes=jaxlora.nnx_kernel_axes(model)"
          " for an NNX model."
      )

  def adapter_output(
      self,
      x: jax.Array,
      lora: Mapping[str, jax.Array],
      *,
      dtype: jnp.dtype,
      precision=None,
  ) -> jax.Array:
    """Compute `scale * einsum(einsum(x, a), b)`, the adapter's share of the output.

    Args:
      x: the layer's input, with axes `inputs`.
      lora: `{a: [*batch, *in, r], b: [*batch, r, *out], scale: [*batch]}`.
      dtype: compute and result dtype, normally the dtype of the layer's output.
      precision: passed to `jnp.einsum`.

    Returns:
      An array with axes `outputs`, to be added to the layer's output.
    """
    batch, fan_in, fan_out = self.roles
    rank = _fresh_labels(str(self), 1)
    a_labels = batch + fan_in + rank
    b_labels = batch + rank + fan_out
    h_labels = "".join(l for l in self.inputs if l not in fan_in) + rank

    scale = jnp.asarray(lora["scale"], jnp.float32)
    scale = scale.reshape(scale.shape + (1,) * (1 + len(fan_out)))
    b = (scale * jnp.asarray(lora["b"], jnp.float32)).astype(dtype)
    h = jnp.einsum(
        f"{self.inputs},{a_labels}->{h_labels}",
        x.astype(dtype), lora["a"].astype(dtype), precision=precision,
    )
    return jnp.einsum(
        f"{h_labels},{b_labels}->{self.outputs}", h, b, precision=precision
    )


def dense(ndim: int) -> Contraction:
  """Return the contraction of `x [..., in] @ kernel [in, out]` for an input of `ndim` axes."""
  labels = _fresh_labels("", ndim + 1)
  return Contraction(
      inputs=labels[:ndim],
      kernel=labels[ndim - 1 : ndim + 1],
      outputs=labels[: ndim - 1] + labels[ndim],
  )


def dense_general(
    ndim: int,
    axis: Sequence[int],
    batch_dims: Sequence[int],
    n_features: int,
) -> Contraction:
  """Return the contraction of `nn.DenseGeneral` or `nnx.LinearGeneral`.

  Args:
    ndim: number of input axes.
    axis: the contracted input axes, in the order the kernel lists them.
    batch_dims: the leading input axes that the kernel also indexes.
    n_features: number of output feature axes.
  """
  axis = tuple(a % ndim for a in axis)
  batch_dims = tuple(b % ndim for b in batch_dims)
  labels = _fresh_labels("", ndim + n_features)
  x_labels, features = labels[:ndim], labels[ndim:]
  return Contraction(
      inputs=x_labels,
      kernel="".join(x_labels[b] for b in batch_dims)
      + "".join(x_labels[a] for a in axis)
      + features,
      outputs="".join(x_labels[i] for i in range(ndim) if i not in axis) + features,
  )


def from_einsum(equation: str, ndim: int, kernel_ndim: int) -> Contraction:
  """Return the contraction of an `nn.Einsum` or `nnx.Einsum` equation.

  An ellipsis may stand for leading input axes; the kernel must label every
  axis explicitly.

  Raises:
    ValueError: if the equation is not `inputs,kernel->outputs`, or its
      operands do not match `ndim` and `kernel_ndim`.
  """
  equation = equation.replace(" ", "")
  if "->" not in equation or equation.count(",") != 1:
    raise ValueError(
        f"Einsum equation {equation!r} must read 'inputs,kernel->outputs'."
    )
  operands, outputs = equation.split("->")
  inputs, kernel = operands.split(",")
  if ELLIPSIS in kernel:
    raise ValueError(
        f"LoRA cannot adapt the einsum {equation!r}: label every kernel axis"
        " instead of using an ellipsis, or leave this layer out of the targets."
    )

  implicit = ""
  explicit = inputs.replace(ELLIPSIS, "")
  if ELLIPSIS in inputs and len(explicit) <= ndim:
    implicit = _fresh_labels(equation, ndim - len(explicit))
    inputs = inputs.replace(ELLIPSIS, implicit)
  outputs = outputs.replace(ELLIPSIS, implicit)
  if len(inputs) != ndim or len(kernel) != kernel_ndim:
    raise ValueError(
        f"Einsum equation {equation!r} labels the axes {inputs!r} of the input"
        f" and {kernel!r} of the kernel, but the input has {ndim} axes and the"
        f" kernel {kernel_ndim}."
    )
  return Contraction(inputs=inputs, kernel=kernel, outputs=outputs)


def _fresh_labels(used: str, count: int) -> str:
  labels = "".join(l for l in string.ascii_letters if l not in used)
  if count > len(labels):
    raise ValueError(f"An einsum with {count} more axes has run out of labels.")
  return labels[:count]
