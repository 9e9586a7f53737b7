"""megatron-core underneath: process groups, the CPU bridge, and fixes of megatron-core bugs."""
