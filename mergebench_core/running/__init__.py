"""Running cells: the grid and each cell (`runner`), where cells run (`executors`, `ray_executor`), what a cell
costs (`resources`) and where per-step metrics go (`loggers`)."""
