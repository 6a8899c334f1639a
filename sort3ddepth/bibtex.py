r"""
@article{Moriya2017,
  title = {High-resolution Single Particle Analysis from Electron Cryo-microscopy Images Using SPHIRE},
  author = {Moriya, Toshio and Saur, Michael and Stabrin, Markus and Merino, Felipe and Voicu, Horatiu and Huang, Zhong and Penczek, Pawel A. and Raunser, Stefan and Gatsogiannis, Christos},
  journal = {Journal of Visualized Experiments},
  volume = {123},
  pages = {e55448},
  year = {2017},
  doi = {10.3791/55448}
}

@misc{Huang2019sort3d,
  title = {SORT3D\_DEPTH: reproducible 3D clustering},
  author = {Huang, Zhong},
  howpublished = {SPHIRE software},
  year = {2019},
  note = {Program sp\_sort3d\_depth.py of the SPHIRE package}
}

@article{Scheres2012relion,
  title = {RELION: Implementation of a Bayesian approach to cryo-EM structure determination},
  author = {Scheres, Sjors H. W.},
  journal = {Journal of Structural Biology},
  volume = {180},
  number = {3},
  pages = {519--530},
  year = {2012},
  doi = {10.1016/j.jsb.2012.09.006}
}
"""
