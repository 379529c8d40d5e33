"""scores: score-based generative prior (noise schedules, networks, training, samplers).

Never imports recon/.
"""
