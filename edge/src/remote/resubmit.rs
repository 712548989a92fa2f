//! Which in-flight requests a client resends to a volume's new owner. SKELETON.
