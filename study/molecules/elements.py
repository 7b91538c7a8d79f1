"""The elements molecules are made of here (H, C, N, O, F) and the Hartree-to-eV factor."""

HARTREE_EV = 27.211386245988  # CODATA 2018
SYMBOLS = {1: "H", 6: "C", 7: "N", 8: "O", 9: "F"}
NUMBERS = {s: z for z, s in SYMBOLS.items()}
ELEMENTS = (1, 6, 7, 8, 9)
