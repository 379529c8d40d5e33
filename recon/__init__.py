"""recon: MRI reconstruction library (operators, data, SURE, BiasRecon adaptation).

Never imports scores/.
"""
