"""train.schedule: checkpoints log-spaced then regular, evaluation every n steps and at the last."""
from train import schedule


def test_save_schedule_is_log_spaced_then_regular():
  assert schedule.save_steps(1000, 100) == [0, 1, 2, 4, 8, 16, 32, 64, 100, 200, 300, 400, 500, 600,
                                            700, 800, 900, 1000]
  assert schedule.save_steps(25, 10, log_spaced=False) == [0, 10, 20, 25]
  assert [s for s in range(1, 13) if schedule.is_eval_step(s, 12, 5)] == [5, 10, 12]
  assert [s for s in range(1, 13) if schedule.is_eval_step(s, 12, 0)] == [12]
