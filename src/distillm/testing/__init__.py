"""What tests (and `--preset tiny`) need, apart from the product: tiny random models built offline (`tiny`,
`tiny_vision`) and the fault hooks of the reliability tests (`faults`: real SIGKILLs at named points, poisoned
losses), all driven by DISTILLM_FAULT and free when it is unset."""
