"""Records and where they come from: the record set (in memory, or on disk: rows, store), vocabulary,
the embedded synthetic scenes, feature skew, partitioners, folder loaders and torch datasets."""
