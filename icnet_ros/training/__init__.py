"""Training: the paper's recipe behind `icnet-train` / `ros2 run icnet_ros train`."""
